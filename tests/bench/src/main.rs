//! `kez-bench` (`make bench`): how fast and how lean kez-chat is, each figure measured beside
//! the raw transport it is built on in the same run, so a noisy machine still gives an honest
//! ratio. Real processes throughout: the pinned nats-server, the `kez-chat-server` and
//! `kez-chat` binaries built next to this one, iroh endpoints on 127.0.0.1 without relays.
//!
//! Prints a table (section, name, ours, baseline, ratio, goal, result) and writes the same as
//! JSON (default `target/bench/results.json`). BENCHMARKS.md explains every figure.

mod callout;
mod chat;
mod crypto;
mod devices;
mod federation;
mod files;
mod footprint;
mod measure;
mod registry;
mod report;
mod service;
mod storm;
mod storm_clients;
mod ui;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};

use measure::Budget;
use report::{Report, Row};

/// Benchmarks of kez-chat against the raw transports it is built on.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Smaller sizes and counts (64 MiB files, 2,000 users, ...): the whole run in under two
    /// minutes, for smoke runs. Figures are noisier.
    #[arg(long)]
    quick: bool,
    /// Run only these sections (repeatable); default all.
    #[arg(long, value_enum)]
    only: Vec<Section>,
    /// Users the footprint section registers (default 100,000; 2,000 with --quick).
    #[arg(long, value_name = "N")]
    users: Option<usize>,
    /// Clients the storm section connects and reconnects (default 10,000; 1,000 with
    /// --quick). Each takes an open file in this process and in nats-server.
    #[arg(long, value_name = "N")]
    clients: Option<usize>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The registry section's baseline: a trivial NATS service answering every request on
    /// SUBJECT with ANSWER_BYTES bytes. Started by `kez-bench` itself.
    #[command(hide = true)]
    ServeEcho {
        /// The broker.
        #[arg(long)]
        url: String,
        /// The subject to answer.
        #[arg(long)]
        subject: String,
        /// The size of every answer.
        #[arg(long)]
        answer_bytes: usize,
    },
    /// The storm section's clients `first..first + count`, driven by the section over
    /// standard input and output. Started by `kez-bench` itself.
    #[command(hide = true)]
    StormClients {
        /// The first client's index of all.
        #[arg(long)]
        first: usize,
        /// How many clients this process holds.
        #[arg(long)]
        count: usize,
        /// First connects in flight at once.
        #[arg(long)]
        concurrency: usize,
    },
}

/// The measurements, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// 1: chat messages end to end against raw JetStream.
    Chat,
    /// 2: registry lookups against an echo service.
    Registry,
    /// 3: connects through the auth callout against static nkey users.
    Callout,
    /// 4: file transfer against raw iroh-blobs; AEAD alone; sender and receiver memory.
    Files,
    /// 5: envelope seal/open and sigchain verification.
    Crypto,
    /// 6: what a registered user costs: broker memory and disk beyond the KV entries,
    /// registration rate, restart and start times, and a user coming online.
    Footprint,
    /// 7: fan-out to a recipient with 1, 3 and 10 devices; connects with a device key.
    Devices,
    /// 8: a CLI send through the home's service against connect-verify-send; the service idle.
    Service,
    /// 9: a message from one browser to another through `kez-chat ui` against the CLI path.
    Ui,
    /// 10: messages across two home servers against the same on one; the outbox's cost.
    Federation,
    /// 11: a broker restart under N connected clients, all reconnecting through the callout.
    Storm,
}

type Rows = Pin<Box<dyn Future<Output = Result<Vec<Row>, String>>>>;

impl Section {
    const ALL: [Section; 11] = [
        Section::Chat,
        Section::Registry,
        Section::Callout,
        Section::Files,
        Section::Crypto,
        Section::Footprint,
        Section::Devices,
        Section::Service,
        Section::Ui,
        Section::Federation,
        Section::Storm,
    ];

    fn run(self, budget: Budget) -> Rows {
        match self {
            Section::Chat => Box::pin(chat::run(budget)),
            Section::Registry => Box::pin(registry::run(budget)),
            Section::Callout => Box::pin(callout::run(budget)),
            Section::Files => Box::pin(files::run(budget)),
            Section::Crypto => Box::pin(async move { crypto::run(budget) }),
            Section::Footprint => Box::pin(footprint::run(budget)),
            Section::Devices => Box::pin(devices::run(budget)),
            Section::Service => Box::pin(service::run(budget)),
            Section::Ui => Box::pin(ui::run(budget)),
            Section::Federation => Box::pin(federation::run(budget)),
            Section::Storm => Box::pin(storm::run(budget)),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match cli.command {
        // The storm's clients share the machine's CPUs with the broker and the callout they
        // measure: one thread per clients process, with no work handed between threads, costs
        // them least.
        Some(Command::StormClients {
            first,
            count,
            concurrency,
        }) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            return match runtime.map_err(|e| e.to_string()).and_then(|runtime| {
                runtime.block_on(storm_clients::serve(first, count, concurrency))
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("kez-bench storm-clients: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(err) => {
            eprintln!("kez-bench: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::ServeEcho {
            url,
            subject,
            answer_bytes,
        }) => {
            return match registry::serve_echo(&url, &subject, answer_bytes).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("kez-bench serve-echo: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::StormClients { .. }) => unreachable!("served before the runtime is built"),
        None => {}
    }

    let budget = Budget {
        quick: cli.quick,
        users: cli.users,
        clients: cli.clients,
    };
    let sections: Vec<Section> = if cli.only.is_empty() {
        Section::ALL.to_vec()
    } else {
        Section::ALL
            .into_iter()
            .filter(|section| cli.only.contains(section))
            .collect()
    };
    let started_at = SystemTime::now();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for section in sections {
        let began = Instant::now();
        eprintln!("kez-bench: {section:?} ...");
        match section.run(budget).await {
            Ok(section_rows) => {
                eprintln!("kez-bench: {section:?} done in {:.1?}", began.elapsed());
                rows.extend(section_rows);
            }
            Err(err) => {
                eprintln!("kez-bench: {section:?} failed: {err}");
                failed.push(section);
            }
        }
    }
    let report = Report::new(started_at, started.elapsed(), cli.quick, rows);
    println!("{}", report.machine);
    println!("{}", report.table());
    if let Err(err) = report.write_json(&cli.out) {
        eprintln!("kez-bench: {err}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "kez-bench: {} rows in {:.0} s, written to {}",
        report.rows.len(),
        report.seconds,
        cli.out.display()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("kez-bench: sections that failed: {failed:?}");
        ExitCode::FAILURE
    }
}
