//! `kez-chat`: the kez-chat command-line client, built on the `kez-client` library.
//!
//! Output: status lines (and the library's warnings, e.g. a dropped inbox message and its reason
//! code; `KEZ_CHAT_LOG` sets the filter) go to stderr, data to stdout, times in local time with
//! the date. `--json` prints one JSON value (`listen --json`: one object per line) with the exact
//! text, which JSON escapes; otherwise every peer-controlled string goes through `display`
//! (controls and bidi characters escaped, continuation lines of a message marked), and tables
//! fit the terminal (columns by width, a cut preview, a command word quoted for the shell).
//! Progress is an indicatif bar on a terminal, else a line per 10%. A file offer is shown as its
//! name, size and download command, never its key.
//!
//! Exit codes ([`EXIT_CODES`], `--help`, tested by `the_exit_code_table_holds`): 1 runtime or
//! network, 2 usage or setup (no server, not registered), 3 not found (unknown handle, not a
//! contact), 4 conflict (handle taken, a pinned key changed), 5 refused (authorization), 6 the
//! home's data is damaged or its key missing.
//!
//! `register` connects with the narrow profile, reads the domain (`kez.server.info`), registers,
//! reconnects for the chat profile, writes the first sigchain link (`add_endpoint` `nats` with
//! the server URL) unless the chain exists, saves server and handle in `config.json`, and
//! confirms with `head`: every step is safe to repeat.
//!
//! Contacts are pinned by `add`, or by `send` on first use (lookup and verified chain either way:
//! `Connection::verify_contact`). `send` verifies the handle again before every message, seals to
//! the contact's current key (a rotation in the contact's chain is followed with a note, no
//! warning) and refuses loudly (exit 4, nothing sent) on a changed identity, a rollback or a
//! fork; `add --accept-key KEY` re-pins only that exact key. `profile` renders the verified chain
//! without pinning; `history` lists the conversations or shows one, a stranger's found by the
//! key the server names for the handle and marked as not a contact.
//!
//! Moving house (`moving.rs`, PROTOCOL.md §14.6): `move --server URL [--name NAME]`, on the
//! device that holds the identity's key, registers it on the new server, copies the sigchain,
//! appends the `nats` and `home` endpoint links there and on the old server, saves the config
//! and moves the service's connection. A contact that moved is followed by `add`/`send` (and by
//! the service on a message from the new home) with a note; `profile` shows `moved to`, and an
//! old handle keeps naming the contact.
//!
//! Pairing (`pairing.rs`): `device join @you` in a fresh home makes the device key, prints a
//! `kez-pair:` request line, its QR code and fingerprint, and waits (countdown, Ctrl-C safe)
//! for an existing device; `device add LINE` there checks the line against its own chain, asks
//! for confirmation (`--yes` for scripts), appends the `add_device` link once the new key's
//! counter-signature verifies under the pasted key, and sends the contacts and settings end to
//! end. The relay (PROTOCOL.md §5.6) is not trusted: see `kez_core::pair`.
//!
//! Files (`files.rs`): `share` verifies the contact, opens the home's blob node, keeps the
//! sigchain's `iroh` endpoint current, encrypts into the node and sends the offer end to end,
//! then waits (progress) until the recipient's download completes or Ctrl-C (`--no-wait`; not
//! for a pinned file);
//! `files` and `download` take offers from contacts only, fetch with progress, decrypt into a
//! temporary file and rename it (Ctrl-C or SIGTERM keeps what arrived, for a resume). The
//! service (`service.rs`) runs the blob node, so the user's files are served while it runs.
//! Shared files
//! (`shared.rs`): `publish` encrypts into the node, records and publishes the manifest (undone if
//! the commit fails); `unpublish`, `shared`, `browse`, and `download @name/FILE` (browse, then
//! the offer path); `profile` counts the files visible to the reader.
//!
//! The service (`service.rs`, PROTOCOL.md §12): a registered home's commands run in its one
//! service process, which this process starts when none runs and talks to over
//! `<home>/service.sock`; the output, prompts, progress and exit code are relayed (`term.rs`), so
//! a command behaves the same either way. `listen` is a view of the service's live events;
//! `inbox` shows what it received and nobody has seen. `service status|stop`.
//!
//! Chat beyond text (`chat.rs`, PROTOCOL.md §8.6): `edit`, `delete`, `react`, `reply` (a
//! message named by an id prefix from `history --ids`), `timer`; the service applies received
//! changes under the store's rules, sends delivery receipts, and read receipts when the person
//! has seen messages (`history @name`, `listen`, `inbox`) unless `settings read-receipts off`;
//! `history @name` shows edits, deletions, replies, reactions and ✓ delivered / ✓✓ read.
//! Typing (`typing @name`) and presence (the service, when it starts and stops) are opt-in
//! live notices (`settings typing on`, `settings presence on`), shown by `listen`. `name`
//! sends a display name (and picture) to every contact; what an identity said about itself is
//! shown beside its handle, quoted, never instead of it. `settings notifications on`: the
//! service runs `notify-send` for each arriving message.

mod chat;
mod display;
mod failure;
mod files;
mod local;
mod moving;
mod pairing;
mod service;
mod shared;
mod term;
mod ui;
mod ui_assets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use kez_client::{
    CheckedContact, ClientError, Config, Connection, Contact, Direction, Home, PinChange,
    Plaintext, Store, StoredMessage, VerifiedChain, VerifiedContact, now,
};
use kez_core::envelope::MessageId;
use kez_core::file::{FILE_OFFER_CONTENT_TYPE, FileOffer};
use kez_core::paper::{PAPER_KEY_WORDS, PaperKey};
use kez_core::sigchain::{Device, DeviceKind, Endpoint};
use kez_core::trust;
use kez_core::{Handle, Op, PublicKey, SecretKey, SignedLink, UnsignedLink};
use serde_json::{Value, json};

use failure::{CONFLICT, Failure, RUNTIME, USAGE};
use service::{Event, Held};
use term::{say, tell, tell_part};

/// The exit codes, as `--help` shows them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime or network failure (server down or not answering, unexpected answer)
  2  usage or setup error (bad arguments, no server configured, not registered yet, a server
     URL that is invalid or unencrypted, a message too long to send, a home others can read)
  3  not found (unknown handle, or not in your contacts)
  4  conflict (handle taken, a contact's key changed, home registered under another name)
  5  refused (the server refused the key or the operation, or kept asking to slow down)
  6  the home's own data is damaged or missing (a damaged or emptied store, a lost key
     file): restore it from a backup";

/// The content type of a text message.
pub(crate) const TEXT: &str = "text";

/// The endpoint `register` writes into the first sigchain link.
const NATS_ENDPOINT: &str = "nats";

/// How often a link of the own chain is made and appended when other devices keep appending
/// first.
const APPEND_TRIES: u32 = 3;
/// How many messages one fetch from the inbox takes at most.
const FETCH_MAX: usize = 256;
/// How many terminal columns of a conversation's last message `history` shows in its list.
const PREVIEW_CHARS: usize = 60;

/// How long the service waits for a new-mail notification before fetching anyway. Notifications
/// are at most once (a reconnect fetches at once, and so does each notification), so this only
/// bounds how late a message may show whose notification was lost otherwise; each fetch costs
/// the server a request, so it is long.
const LISTEN_WAIT: Duration = Duration::from_secs(300);

/// kez-chat: end-to-end encrypted chat for `@name@domain` handles backed by an ed25519 KEZ key.
///
/// Start with `kez-chat --server nats://HOST:4222 register NAME`; then `add @friend`,
/// `send @friend "hi"`, and `inbox` or `listen`.
#[derive(Parser)]
#[command(version, after_help = EXIT_CODES)]
struct Cli {
    /// The client's home directory (key, config, store); default `$XDG_DATA_HOME/kez-chat`.
    #[arg(long, global = true, env = "KEZ_CHAT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// The server's NATS URL, e.g. `tls://kez.lat:4222`; remembered by `register`.
    #[arg(long, global = true, env = "KEZ_CHAT_SERVER", value_name = "URL")]
    server: Option<String>,
    /// Allow an unencrypted `nats://` URL to a server on another machine (anyone on the way can
    /// read and change the traffic); remembered by `register`. Loopback needs no allowance.
    #[arg(long, global = true, env = "KEZ_CHAT_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// `kez-chat device …`.
#[derive(Subcommand)]
enum DeviceChange {
    /// On a new device (a fresh home, `--home DIR --server URL`): ask to become a device of
    /// your identity. Shows a pairing request (a line and a QR code) to carry to one of your
    /// devices, where `kez-chat device add` adds this one, and waits for it.
    Join {
        /// Your handle, e.g. `@alice` or `@alice@kez.lat`.
        handle: String,
        /// This device's name (default: its kind and the start of its key).
        #[arg(long)]
        name: Option<String>,
        /// What this device is: `cli`, `desktop` or `mobile`.
        #[arg(long, default_value = "cli", value_parser = pairing::parse_kind)]
        kind: DeviceKind,
        /// How long the request lives and this command waits, in seconds (at most 900).
        #[arg(long, default_value_t = kez_core::pair::DEFAULT_LIFETIME_SECS)]
        wait: u64,
    },
    /// On one of your devices: add the new device whose pairing request (`kez-pair:…`,
    /// shown by `device join`) you paste here, after checking its fingerprint.
    Add {
        /// The pairing request line, as the new device shows it.
        request: String,
        /// Do not ask for confirmation (for scripts).
        #[arg(long)]
        yes: bool,
    },
    /// Revoke a device (a lost phone, a paper key someone may have seen): from the next link on
    /// its key signs nothing for you. Revoke other devices from this one; the last one stays.
    Revoke {
        /// Its name, as `kez-chat devices` lists it.
        name: String,
        /// Why, kept in the chain's link (visible to everyone who reads your chain).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Who asks for a new paper key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PaperKeyAsk {
    /// `kez-chat paperkey`.
    Command,
    /// `kez-chat register`, printing JSON or not.
    Registration { json: bool },
}

/// The commands.
#[derive(Subcommand)]
enum Command {
    /// Make a key (or use the home's), register NAME on the server and write the first
    /// sigchain link. Running it again is harmless.
    Register {
        /// The name to register, e.g. `alice` or `@alice`.
        name: String,
        /// Make no paper key (for scripts; `kez-chat paperkey` makes one later). By default a
        /// registration shows a new paper key once and asks for one of its words back.
        #[arg(long)]
        no_paper_key: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the own key, handle, server and sigchain head.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Look a handle up, verify its sigchain and pin its key in the contacts (trust on first
    /// use).
    Add {
        /// The handle, e.g. `@bob` or `@bob@kez.lat`.
        handle: String,
        /// Replace the pinned key with this one (`ed25519:...`), after checking with the
        /// contact another way that it is their new key. Only this exact key is accepted.
        #[arg(long, value_name = "KEY")]
        accept_key: Option<PublicKey>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a person's verified sigchain: key, registration, endpoints, claims, shared files.
    Profile {
        /// The handle, e.g. `@bob` or `@bob@kez.lat`.
        handle: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the own devices, from the own sigchain as verified here (never the server's word):
    /// each device's name, kind, key, and the links that added and revoked it.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the own devices: `device join @you` (on a new device), `device add REQUEST`,
    /// `device revoke NAME`.
    Device {
        /// What to change.
        #[command(subcommand)]
        change: DeviceChange,
    },
    /// Make a paper key: 24 words that are a device of your identity, kept on paper for when
    /// every other device is lost. Shown once and never stored; you type one of them back
    /// before it is added to your sigchain.
    Paperkey {
        /// Its device name (default: `paper1`, or the next number free).
        #[arg(long)]
        name: Option<String>,
    },
    /// Recover your identity on this fresh home from your paper key: the 24 words (typed on
    /// stdin, never stored) add this home as a new device, and revoke the lost devices you
    /// name. Then make a new paper key if the old one may have been seen.
    Recover {
        /// Your handle, e.g. `@alice@kez.lat`.
        handle: String,
        /// This device's name (default: `device1`, or the next number free).
        #[arg(long)]
        name: Option<String>,
        /// A lost device to revoke, by name as `kez-chat devices` listed it (repeat for more).
        #[arg(long = "revoke", value_name = "NAME")]
        revoke: Vec<String>,
    },
    /// Move your identity to another domain's server (with `--server URL`): register NAME
    /// there with your identity key, copy your sigchain, and name the new home in it. Contacts
    /// follow (same identity, their pins stay); the old server forwards your mail while it
    /// runs. Run it on the device that registered (it holds the identity's key).
    Move {
        /// Your name on the new server (default: your name now).
        #[arg(long)]
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the contacts and their pinned keys.
    Contacts {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a text message; prints the message id once the server stored it. A recipient not
    /// in the contacts is looked up, verified and pinned; a changed key is refused.
    Send {
        /// The recipient's handle.
        handle: String,
        /// The text (several words are joined with spaces); read from stdin when absent.
        text: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch the messages that arrived (also while offline), print them and exit.
    Inbox {
        /// Wait up to this many seconds for messages when none are there.
        #[arg(long, default_value_t = 0, value_name = "SECS")]
        wait: u64,
        /// Print JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Print messages as they arrive, until Ctrl-C.
    Listen {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
        /// With --json, for a view that shows only what it looks at (the web UI): print every
        /// event as a JSON line (`changed`, `typing`, `presence`, `note` besides messages), and
        /// leave marking a conversation read to `history @name`.
        #[arg(long, requires = "json")]
        events: bool,
    },
    /// Encrypt a file and offer it to someone: the encrypted file stays in your file node
    /// (never on the chat server); the offer (name, size, hash, key) goes end-to-end encrypted.
    /// They can download it while your kez-chat service runs (any command starts it).
    ///
    /// Then, like sendme, it waits with progress until they have downloaded all of it, however
    /// long that takes (there is no timeout), also when not on a terminal. Ctrl-C stops only
    /// the waiting (exit 0): your service keeps serving the file. A pinned file is not waited
    /// for (the server has it), nor with --no-wait.
    Share {
        /// The recipient's handle.
        handle: String,
        /// The file.
        path: PathBuf,
        /// Also ask the home server to keep (pin) the encrypted file, so it can be downloaded
        /// while you are offline (counts against your quota there).
        #[arg(long)]
        pin: bool,
        /// Return once the offer is sent, without waiting for the download (for scripts).
        #[arg(long)]
        no_wait: bool,
        /// Print JSON, once share ends (`downloaded`: whether it saw them download all of it).
        #[arg(long)]
        json: bool,
    },
    /// List the files offered to you.
    Files {
        /// Print JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Download an offered or a published file: fetched from the sender's node (or their
    /// server's pin node), verified, decrypted, then written. An interrupted download resumes.
    Download {
        /// An offer's id or the start of it (the first column of `files`), or `@name/FILE`
        /// for a file `@name` publishes (see `browse @name`).
        #[arg(value_name = "OFFER | @name/FILE")]
        offer: String,
        /// Where to write the file [default: its name, in the current directory].
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish a file in your shared-files manifest: for everyone (`--public`) or only for
    /// the people named with `--to`. Nobody else can see a private file, nor whom it is for.
    /// Encrypted before it leaves; fetched from your node while your kez-chat service runs
    /// (or from your server with --pin).
    #[command(group(clap::ArgGroup::new("audience").required(true).args(["to", "public"])))]
    Publish {
        /// The file.
        path: PathBuf,
        /// Who may see it (repeat for several); each is checked as for `send`.
        #[arg(long = "to", value_name = "HANDLE", conflicts_with = "public")]
        to: Vec<String>,
        /// Everyone who browses you may see and download it.
        #[arg(long)]
        public: bool,
        /// The name to publish it under [default: the file's name].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Ask the home server to pin it, and your manifest from now on, so it stays
        /// available while you are offline (counts against your quota there).
        #[arg(long)]
        pin: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop publishing a file: a new manifest without it is committed to your sigchain.
    Unpublish {
        /// The published name (see `shared`).
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the files you publish, and whom each is for.
    Shared {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the files someone publishes that you may see (public ones, and those for you),
    /// after verifying their sigchain and manifest.
    Browse {
        /// The handle, e.g. `@alice` or `@alice@kez.lat`.
        handle: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Find the messages that contain some words (ignoring case): in the text of messages and
    /// the names of offered files, in every conversation this home holds.
    Search {
        /// The words, as one phrase.
        #[arg(required = true)]
        words: Vec<String>,
        /// Print JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Open the web UI: serves it on 127.0.0.1 with an address that holds a new secret token,
    /// opens your browser there (or prints the address), and runs until Ctrl-C. The page does
    /// what the CLI does, through this home's service; in a new home it registers you first.
    Ui {
        /// The loopback port to serve on (0: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Do not open a browser; only print the address.
        #[arg(long)]
        no_open: bool,
        /// Print the address as one JSON line, `{"url": …}`.
        #[arg(long)]
        json: bool,
    },
    /// Run this home's service in the foreground (for a systemd user unit and the like; any
    /// other command starts one in the background when none runs): it holds the store, the
    /// connection and the file node, receives messages and serves your files while it runs.
    Service {
        /// `status` or `stop`; nothing to run it.
        #[command(subcommand)]
        action: Option<ServiceAction>,
        /// Started by a client: say on stdout, in one JSON line, whether it is ready.
        #[arg(long, hide = true)]
        announce: bool,
    },
    /// Show the conversation with someone; without a handle, list the conversations (the
    /// latest first, with their unread messages).
    History {
        /// The handle, e.g. `@bob`; someone not in your contacts is looked up on the server
        /// and their messages shown marked so.
        handle: Option<String>,
        /// Begin each message with its id (its first 8 hex digits), for `edit`, `delete`,
        /// `react` and `reply`.
        #[arg(long)]
        ids: bool,
        /// Print JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Edit a message you sent: everyone's devices show the new text, marked edited.
    Edit {
        /// The conversation, e.g. `@bob`.
        handle: String,
        /// The message: its id or its first few hex digits (`history @bob --ids`).
        id: String,
        /// The new text (several words are joined with spaces).
        #[arg(required = true)]
        text: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a message you sent, for everyone: their devices drop its text and show it as
    /// deleted (a modified client could have kept a copy).
    Delete {
        /// The conversation, e.g. `@bob`.
        handle: String,
        /// The message: its id or its first few hex digits.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// React to a message with an emoji (`--remove` takes it back).
    React {
        /// The conversation, e.g. `@bob`.
        handle: String,
        /// The message: its id or its first few hex digits.
        id: String,
        /// The emoji, e.g. 👍.
        emoji: String,
        /// Take the reaction back.
        #[arg(long)]
        remove: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reply to a message: a text message that quotes it.
    Reply {
        /// The conversation, e.g. `@bob`.
        handle: String,
        /// The message: its id or its first few hex digits.
        id: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true)]
        text: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the messages of a conversation disappear: those sent from now on are deleted on
    /// every device of both sides this long after they were sent (`off` stops it).
    Timer {
        /// The conversation, e.g. `@bob`.
        handle: String,
        /// e.g. `30s`, `10m`, `1h`, `7d`, or `off`.
        duration: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the name (and picture) your contacts see beside your handle: sent to each of them
    /// in a message your key signs, so nobody else can set it for you.
    Name {
        /// e.g. `"Alice Liddell"` (1 to 64 characters).
        name: String,
        /// A PNG, JPEG or WebP picture of at most 48,000 bytes.
        #[arg(long, value_name = "FILE")]
        avatar: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tell a contact you are typing (or, with `--stop`, that you stopped): a live notice,
    /// never stored; only with `settings typing on`.
    Typing {
        /// The contact, e.g. `@bob`.
        handle: String,
        /// You stopped typing.
        #[arg(long)]
        stop: bool,
    },
    /// Show the settings, or change one: `settings read-receipts off`,
    /// `settings notifications on`, `settings typing on`, `settings presence on`.
    Settings {
        /// The setting: `read-receipts`, `notifications`, `typing` or `presence`.
        key: Option<String>,
        /// `on` or `off`.
        value: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `kez-chat service …`.
#[derive(Subcommand)]
enum ServiceAction {
    /// Whether the service runs, and what it does.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the service (running commands get a few seconds to finish).
    Stop,
}

#[tokio::main]
async fn main() {
    // Warnings of the client library (a message dropped from the inbox and why) go to stderr
    // beside the status lines; KEZ_CHAT_LOG (an env-filter, e.g. `kez_client=debug`) says more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEZ_CHAT_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("kez_client=warn,kez_chat=warn,kez_blobs=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()),
        )
        .with_target(false)
        .without_time()
        .init();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let code = match run(cli, &matches).await {
        Ok(code) => code,
        Err(failure) => {
            // Failures may quote what a server or a peer sent.
            tell!("kez-chat: {}", display::body(&failure.message));
            failure.code
        }
    };
    // Not a return: a read of stdin for the service may still block a thread, and the runtime
    // would wait for it.
    std::process::exit(i32::from(code));
}

/// Runs one command, through the home's service once it is registered; returns the exit code.
async fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<u8, Failure> {
    let dir = match &cli.home {
        Some(dir) => dir.clone(),
        None => kez_client::home::home_dir_from_env().map_err(Failure::home)?,
    };
    // Only `register`, `recover` and `device join` make a home; a read of one that does not
    // exist creates nothing.
    let makes_home = matches!(
        cli.command,
        Command::Register { .. }
            | Command::Ui { .. }
            | Command::Recover { .. }
            | Command::Device {
                change: DeviceChange::Join { .. }
            }
    );
    if !makes_home && !dir.exists() {
        return Err(Failure::new(
            USAGE,
            format!(
                "there is no kez-chat home at {}: run `kez-chat --server tls://HOST:4222 register NAME` to make one, or `kez-chat --server tls://HOST:4222 recover @NAME@DOMAIN` to recover yours from its paper key (or pass --home DIR)",
                dir.display()
            ),
        ));
    }
    let home = Home::open(dir).map_err(Failure::home)?;
    match cli.command {
        Command::Ui {
            port,
            no_open,
            json,
        } => {
            let options = ui::Options {
                port,
                open: !no_open,
                json,
                server: cli.server,
            };
            return ui::serve(home, options).await.map(|()| 0);
        }
        Command::Service {
            action: None,
            announce,
        } => return service::serve(home, announce).await.map(|()| 0),
        Command::Service {
            action: Some(ServiceAction::Status { json }),
            ..
        } => {
            return service::control(&home, local::Request::Status {}, json)
                .await
                .map(|()| 0);
        }
        Command::Service {
            action: Some(ServiceAction::Stop),
            ..
        } => {
            return service::control(&home, local::Request::Stop {}, false)
                .await
                .map(|()| 0);
        }
        _ => {}
    }
    let config = home.config().map_err(Failure::home)?;
    // A registered home's commands run in its service. An unregistered one has nothing for a
    // service to own: `register`, `recover` and `device join` make it, the others say so.
    if config.handle.is_some() {
        return service::run_as_client(&home, forwarded(matches)?).await;
    }
    if service::lock_held(&home) {
        return Err(Failure::new(
            CONFLICT,
            "the kez-chat service runs for this home: stop it first (`kez-chat service stop`)",
        ));
    }
    let app = App {
        config,
        home,
        server_flag: cli.server,
        plaintext_flag: cli.allow_plaintext,
        held: Held::own(),
    };
    let held = app.held.clone();
    let result = command(app, cli.command).await;
    held.release().await;
    result.map(|()| 0)
}

/// This process's command line for the service: its arguments, with the flags that came from
/// the environment made explicit (the service has its own).
fn forwarded(matches: &clap::ArgMatches) -> Result<Vec<String>, Failure> {
    let mut args = Vec::new();
    if matches.value_source("server") == Some(ValueSource::EnvVariable)
        && let Some(server) = matches.get_one::<String>("server")
    {
        args.extend(["--server".to_owned(), server.clone()]);
    }
    if matches.value_source("allow_plaintext") == Some(ValueSource::EnvVariable)
        && matches.get_flag("allow_plaintext")
    {
        args.push("--allow-plaintext".to_owned());
    }
    for arg in std::env::args_os().skip(1) {
        args.push(arg.into_string().map_err(|arg| {
            Failure::new(
                USAGE,
                format!("{arg:?} is not UTF-8: give paths and text as UTF-8"),
            )
        })?);
    }
    Ok(args)
}

/// Runs `command` as `app`.
async fn command(app: App, command: Command) -> Result<(), Failure> {
    match command {
        Command::Register {
            name,
            no_paper_key,
            json,
        } => app.register(&name, !no_paper_key, json).await,
        Command::Whoami { json } => app.whoami(json).await,
        Command::Add {
            handle,
            accept_key,
            json,
        } => app.add(&handle, accept_key, json).await,
        Command::Contacts { json } => app.contacts(json),
        Command::Move { name, json } => app.move_home(name, json).await,
        Command::Profile { handle, json } => app.profile(&handle, json).await,
        Command::Devices { json } => app.devices(json).await,
        Command::Paperkey { name } => app.paperkey(name, PaperKeyAsk::Command).await,
        Command::Recover {
            handle,
            name,
            revoke,
        } => app.recover(&handle, name, &revoke).await,
        Command::Device {
            change: DeviceChange::Revoke { name, reason },
        } => app.revoke_device(&name, reason.as_deref()).await,
        Command::Device {
            change:
                DeviceChange::Join {
                    handle,
                    name,
                    kind,
                    wait,
                },
        } => app.join(&handle, name, kind, wait).await,
        Command::Device {
            change: DeviceChange::Add { request, yes },
        } => app.add_device(&request, yes).await,
        Command::Send { handle, text, json } => app.send(&handle, text, json).await,
        Command::Inbox { wait, json } => app.inbox(Duration::from_secs(wait), json).await,
        Command::Listen { json, events } => app.listen(json, events).await,
        Command::History {
            handle: Some(handle),
            ids,
            json,
        } => app.history(&handle, ids, json).await,
        Command::History {
            handle: None, json, ..
        } => app.conversations(json),
        Command::Edit {
            handle,
            id,
            text,
            json,
        } => {
            app.change(&handle, &id, chat::Change::Edit(text.join(" ")), json)
                .await
        }
        Command::Delete { handle, id, json } => {
            app.change(&handle, &id, chat::Change::Delete, json).await
        }
        Command::React {
            handle,
            id,
            emoji,
            remove,
            json,
        } => {
            app.change(&handle, &id, chat::Change::React { emoji, remove }, json)
                .await
        }
        Command::Reply {
            handle,
            id,
            text,
            json,
        } => {
            app.change(&handle, &id, chat::Change::Reply(text.join(" ")), json)
                .await
        }
        Command::Timer {
            handle,
            duration,
            json,
        } => app.timer(&handle, &duration, json).await,
        Command::Typing { handle, stop } => app.typing(&handle, !stop).await,
        Command::Name { name, avatar, json } => {
            app.set_name(&name, avatar.map(|path| term::path(&path)).as_deref(), json)
                .await
        }
        Command::Settings { key, value, json } => {
            app.settings(key.as_deref(), value.as_deref(), json)
        }
        Command::Search { words, json } => app.search(&words.join(" "), json),
        Command::Share {
            handle,
            path,
            pin,
            no_wait,
            json,
        } => {
            app.share(&handle, &term::path(&path), pin, !no_wait, json)
                .await
        }
        Command::Files { json } => app.files(json),
        Command::Download {
            offer,
            output,
            json,
        } => match offer.split_once('/') {
            Some((handle, name)) if handle.starts_with('@') => {
                app.download_published(handle, name, output, json).await
            }
            _ => app.download(&offer, output, json).await,
        },
        Command::Publish {
            path,
            to,
            public,
            name,
            pin,
            json,
        } => {
            let audience = if public {
                shared::Audiences::Public
            } else {
                shared::Audiences::To(to)
            };
            app.publish(&term::path(&path), audience, name, pin, json)
                .await
        }
        Command::Unpublish { name, json } => app.unpublish(&name, json).await,
        Command::Shared { json } => app.shared(json),
        Command::Browse { handle, json } => app.browse(&handle, json).await,
        Command::Service { .. } => Err(Failure::new(
            USAGE,
            "`kez-chat service` runs on its own, not as a command of a service",
        )),
        Command::Ui { .. } => Err(Failure::new(
            USAGE,
            "`kez-chat ui` runs on its own, not as a command of a service",
        )),
    }
}

/// The home, its config, the `--server` and `--allow-plaintext` flags, and what the command
/// uses (the service's, or its own).
struct App {
    home: Home,
    config: Config,
    server_flag: Option<String>,
    plaintext_flag: bool,
    held: Arc<Held>,
}

impl App {
    /// The server URL: `--server`, else the config's.
    fn server(&self) -> Result<String, Failure> {
        self.server_flag
            .clone()
            .or_else(|| self.config.server.clone())
            .ok_or_else(|| {
                Failure::new(
                    USAGE,
                    "no server configured: pass --server nats://HOST:4222 (or set KEZ_CHAT_SERVER), \
                     or run `kez-chat --server nats://HOST:4222 register <name>` first",
                )
            })
    }

    /// The own handle; an error telling how to register when there is none.
    fn handle(&self) -> Result<&str, Failure> {
        self.config.handle.as_deref().ok_or_else(|| {
            Failure::new(
                USAGE,
                format!(
                    "this home ({}) is not registered yet: run `kez-chat --server nats://HOST:4222 register <name>`",
                    self.home.dir().display()
                ),
            )
        })
    }

    /// The own key; the home must be registered.
    fn key(&self) -> Result<Arc<SecretKey>, Failure> {
        self.handle()?;
        Ok(Arc::new(self.home.key().map_err(Failure::home)?))
    }

    /// The store.
    fn store(&self) -> Result<Arc<Store>, Failure> {
        self.held.store(&self.home)
    }

    /// `handle` in full form (`@name@domain`), bare names taking the own domain.
    fn full_handle(&self, handle: &str) -> Result<Handle, Failure> {
        let own = self.handle()?;
        let domain = own.rsplit('@').next().unwrap_or_default();
        Handle::parse(handle, domain)
            .map_err(|err| Failure::new(USAGE, format!("{handle:?} is not a valid handle: {err}")))
    }

    /// The connection as the registered key: the service's, or one for this command.
    async fn connect(&self) -> Result<Connection, Failure> {
        let key = self.key()?;
        let url = self.server()?;
        self.held
            .connection(&url, &key.clone(), async |options| {
                self.connect_with(&url, key, options).await
            })
            .await
    }

    /// Appends the link of the own chain that `build` makes on the chain as it is now, holding
    /// the home's chain lock. When another device appended first (a 409 `conflict`,
    /// `wrong_seq` or `wrong_prev`, by timing, PROTOCOL.md §5: a device that just joined
    /// announces its file node), the link is made again on the new head, at most
    /// [`APPEND_TRIES`] times in all.
    async fn append_own(
        &self,
        conn: &Connection,
        build: impl Fn(&VerifiedChain) -> Result<SignedLink, Failure>,
    ) -> Result<kez_client::ChainHead, Failure> {
        let _writing = self.held.chain_writer.lock().await;
        let mut tries = 1;
        loop {
            let chain = conn
                .chain(&conn.identity())
                .await
                .map_err(Failure::client)?;
            let link = build(&chain)?;
            match conn.append(link.bytes()).await {
                Err(ClientError::Service(err))
                    if err.answer.code == 409
                        && matches!(
                            err.answer.name.as_ref(),
                            "conflict" | "wrong_seq" | "wrong_prev"
                        )
                        && tries < APPEND_TRIES =>
                {
                    tries += 1;
                }
                Err(err) => return Err(Failure::client(err)),
                Ok(head) => return stored_as_sent(head, &link),
            }
        }
    }

    /// Whether plaintext to another machine is allowed: `--allow-plaintext`, or the config's.
    fn plaintext(&self) -> Plaintext {
        if self.plaintext_flag || self.config.allow_plaintext {
            Plaintext::Allowed
        } else {
            Plaintext::LoopbackOnly
        }
    }

    /// Connects to `url` as `key`, a device of the own identity.
    async fn connect_to(&self, url: &str, key: Arc<SecretKey>) -> Result<Connection, Failure> {
        let options = Connection::options(&key);
        self.connect_with(url, key, options).await
    }

    /// Connects to `url` as `key` with `options` ([`Connection::options`] and more), speaking
    /// for the own identity when this home's key is another device of it.
    async fn connect_with(
        &self,
        url: &str,
        key: Arc<SecretKey>,
        options: async_nats::ConnectOptions,
    ) -> Result<Connection, Failure> {
        let conn = Connection::connect_with(url, key, options, self.plaintext())
            .await
            .map_err(Failure::client)?;
        Ok(match self.config.identity {
            Some(identity) => conn.as_device_of(identity),
            None => conn,
        })
    }

    /// `register <name>`.
    async fn register(mut self, name: &str, paper_key: bool, json: bool) -> Result<(), Failure> {
        let url = self.server()?;
        // A name no server takes is refused before a key is made or a server asked (its domain,
        // if it names one, is checked against the server's below).
        Handle::parse(name, "kez.invalid")
            .map_err(|err| Failure::new(USAGE, format!("{name:?} is not a valid name: {err}")))?;
        // One URL, or a cluster's several: written to the sigchain in one normal form.
        let url = kez_client::broker_urls(&url, self.plaintext())
            .map_err(|err| Failure::client(err.into()))?
            .join(",");
        if let (Some(existing), Some(_)) = (&self.config.handle, self.config.identity) {
            return Err(Failure::new(
                failure::CONFLICT,
                format!(
                    "this home is a device of {existing}, not an identity of its own: to register a new name, use another home (--home DIR)"
                ),
            ));
        }
        if let Some(existing) = &self.config.handle
            && !self.home.has_key()
        {
            return Err(Failure::new(
                failure::DAMAGED,
                format!(
                    "this home is registered as {existing}, but its key file {} is missing. That key is the identity {existing}: a new key cannot become it, and nothing was changed. Restore the key file from a backup (it is one line, `ed25519-secret:…`, mode 600); without it, register a new name in a new home (--home DIR)",
                    self.home.key_path().display()
                ),
            ));
        }
        let (key, created) = self.home.key_or_create().map_err(Failure::home)?;
        let key = Arc::new(key);
        tell!(
            "{} key {} in {}",
            if created { "made" } else { "using" },
            key.public_key(),
            self.home.key_path().display()
        );

        tell!("connecting to {url}");
        let narrow = self.connect_to(&url, key.clone()).await?;
        // Kept from the first connection on: a registration that fails later (the server's
        // storage unavailable) is retried with `register NAME` alone.
        if self.config.server.as_deref() != Some(url.as_str()) && self.config.handle.is_none() {
            self.config.server = Some(url.clone());
            self.config.allow_plaintext |= self.plaintext_flag;
            self.home.save_config(&self.config).map_err(Failure::home)?;
        }
        let info = narrow.server_info().await.map_err(Failure::client)?;
        let wanted = Handle::parse(name, &info.domain)
            .map_err(|err| Failure::new(USAGE, format!("{name:?} is not a valid name: {err}")))?;
        if wanted.domain() != info.domain {
            return Err(Failure::new(
                USAGE,
                format!(
                    "{wanted} is a handle on {}, but {url} serves {}: register it with {}'s own server, or register @{} here",
                    wanted.domain(),
                    info.domain,
                    wanted.domain(),
                    wanted.name()
                ),
            ));
        }
        let again = match &self.config.handle {
            Some(existing) if *existing == wanted.to_string() => true,
            Some(existing) => {
                return Err(Failure::new(
                    failure::CONFLICT,
                    format!(
                        "this home is already registered as {existing}; to register {wanted}, use another home (--home DIR)"
                    ),
                ));
            }
            None => false,
        };
        // Registering again is harmless (the server answers the record it has), and repairs a
        // server that lost the registration, e.g. restored from an older backup.
        let record = narrow.register(name).await.map_err(Failure::client)?;
        let _ = narrow.close().await;
        if again {
            tell!("already registered as {}", record.handle);
        } else {
            tell!("registered {} on {}", record.handle, info.domain);
        }

        // The chat profile comes with a new connection (PROTOCOL.md §6.2).
        let full = self.connect_to(&url, key.clone()).await?;
        let writing = self.held.chain_writer.lock().await;
        match full.head(&key.public_key()).await {
            Ok(head) => tell!("sigchain already started (seq {})", head.seq),
            Err(ClientError::Service(err)) if err.answer.code == 404 => {
                let op = Op::AddEndpoint(Endpoint {
                    name: NATS_ENDPOINT.into(),
                    kind: NATS_ENDPOINT.into(),
                    address: url.clone(),
                });
                let link = UnsignedLink::first(key.public_key(), now(), op)
                    .sign(&key)
                    .map_err(|err| {
                        Failure::new(RUNTIME, format!("cannot sign the first link: {err}"))
                    })?;
                full.append(link.bytes()).await.map_err(Failure::client)?;
                tell!("wrote the first sigchain link (nats endpoint {url})");
            }
            Err(err) => return Err(Failure::client(err)),
        }
        drop(writing);
        let node = self.open_node().await?;
        self.advertise_node(&full, &key, &node).await?;
        // open_node kept the node's address in the config file.
        self.config.iroh_bind = self.home.config().map_err(Failure::home)?.iroh_bind;
        // Forward secrecy from the first message on (PROTOCOL.md §15): prekeys published and
        // the Olm key bound before anyone can add us.
        {
            let store = self.store()?;
            let _writing = self.held.chain_writer.lock().await;
            match full.prepare_forward_secrecy(&store).await {
                Ok(kez_client::ForwardSecrecy::Ready) => {
                    tell!(
                        "published prekeys and bound this device's Olm key: messages are forward secret"
                    );
                }
                Ok(kez_client::ForwardSecrecy::Unavailable(why)) => {
                    tell!(
                        "note: messages are not forward secret yet: {}",
                        display::inline(&why)
                    );
                }
                Err(err) => return Err(Failure::client(err)),
            }
        }
        let _ = full.close().await;

        self.config.server = Some(url.clone());
        self.config.allow_plaintext |= self.plaintext_flag;
        self.config.handle = Some(record.handle.to_string());
        self.home.save_config(&self.config).map_err(Failure::home)?;
        if paper_key {
            self.paperkey(None, PaperKeyAsk::Registration { json })
                .await?;
        }
        let head = self.confirm(&url, key.clone()).await?;
        if json {
            print_json(&json!({
                "handle": record.handle,
                "key": key.public_key().to_string(),
                "server": url,
                "new_key": created,
                "already_registered": again,
                "sigchain": { "seq": head.seq, "head": head.head.to_string() },
            }));
        } else {
            say!("registered as {}", record.handle);
            say!("key     {}", key.public_key());
            say!("server  {url}");
            say!("head    seq {} {}", head.seq, head.head);
        }
        Ok(())
    }

    /// Reconnects and checks that the key has the chat profile (its chain head is readable).
    async fn confirm(
        &self,
        url: &str,
        key: Arc<SecretKey>,
    ) -> Result<kez_client::ChainHead, Failure> {
        let me = key.public_key();
        let conn = self.connect_to(url, key).await?;
        let head = conn.head(&me).await.map_err(Failure::client)?;
        let _ = conn.close().await;
        Ok(head)
    }

    /// `whoami`.
    async fn whoami(&self, json: bool) -> Result<(), Failure> {
        let handle = self.handle()?;
        let conn = self.connect().await?;
        let me = conn.identity();
        let device = conn.public_key();
        let head = conn.head(&me).await.map_err(Failure::client)?;
        let server = self.server()?;
        let name = self.store()?.profile(&me).ok().flatten();
        if json {
            print_json(&json!({
                "handle": handle,
                "key": me.to_string(),
                "device": device.to_string(),
                "nkey": device.to_nkey(),
                "server": server,
                "sigchain": { "seq": head.seq, "head": head.head.to_string() },
                "display_name": name.map(|(profile, _)| profile.display_name),
            }));
        } else {
            say!("handle  {handle}");
            say!("key     {me}");
            if device != me {
                say!("device  {device}");
            }
            say!("nkey    {}", device.to_nkey());
            say!("server  {server}");
            say!("head    seq {} {}", head.seq, head.head);
            if let Some((profile, _)) = name {
                say!("name    \"{}\"", display::inline(&profile.display_name));
            }
        }
        Ok(())
    }

    /// `add @name [--accept-key KEY]`.
    async fn add(
        &self,
        handle: &str,
        accept_key: Option<PublicKey>,
        json: bool,
    ) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let verified = match &accept_key {
            Some(key) => conn.accept_key_change(&store, &full, key).await,
            None => conn.verify_contact(&store, &full).await,
        };
        let VerifiedContact {
            contact,
            change,
            devices_changed,
            chain,
            moved,
        } = verified.map_err(|err| Failure::contact(err, &full))?;
        if let Some(moved) = &moved {
            tell!("{}", moving::moved_note(moved));
        }
        let endpoints: Vec<&str> = chain.endpoints().keys().map(String::as_str).collect();
        if json {
            print_json(&json!({
                "handle": contact.handle,
                "key": contact.key.to_string(),
                "current_key": contact.current_key.to_string(),
                "added_at": contact.added_at,
                "change": change_name(change),
                "sigchain": { "seq": chain.seq(), "head": chain.head().to_string() },
                "endpoints": endpoints,
            }));
        } else {
            if accept_key.is_some() {
                tell!("accepted the new key of {}: pinned again", contact.handle);
            } else {
                match change {
                    PinChange::New => tell!("added {} (key pinned)", contact.handle),
                    PinChange::Same if devices_changed.is_empty() => {
                        tell!("{} was already in your contacts, same key", contact.handle)
                    }
                    PinChange::Same | PinChange::Rotated { .. } => {}
                }
                for note in change_notes(&contact, change, &devices_changed, &chain) {
                    tell!("{note}");
                }
            }
            say!("{}  {}", contact.handle, contact.key);
            say!(
                "  sigchain verified: seq {}, endpoints: {}",
                chain.seq(),
                endpoints.join(", ")
            );
        }
        Ok(())
    }

    /// `devices`: the own chain's devices, verified here.
    async fn devices(&self, json: bool) -> Result<(), Failure> {
        let store = self.store()?;
        let conn = self.connect().await?;
        let me = conn.public_key();
        let chain = conn
            .chain(&conn.identity())
            .await
            .map_err(Failure::client)?;
        let last_seen = |key: &PublicKey| store.last_seen(key).ok().flatten();
        if json {
            print_json(&json!({
                "this_device": me.to_string(),
                "devices": devices_json(chain.devices(), last_seen),
            }));
            return Ok(());
        }
        for device in chain.devices() {
            let this = if device.key == me {
                "  (this device)"
            } else {
                ""
            };
            say!("{}{this}", device_line(device, last_seen(&device.key)));
        }
        Ok(())
    }

    /// `device revoke NAME [--reason TEXT]`: a `revoke_device` link for the own active device
    /// of that name, signed by this device.
    async fn revoke_device(&self, name: &str, reason: Option<&str>) -> Result<(), Failure> {
        let key = self.key()?;
        let me = key.public_key();
        let conn = self.connect().await?;
        let chain = conn
            .chain(&conn.identity())
            .await
            .map_err(Failure::client)?;
        let Some(device) = chain.active_devices().find(|device| device.name == name) else {
            return Err(Failure::new(
                failure::NOT_FOUND,
                format!(
                    "no active device is named {}; yours are: {}",
                    display::inline(name),
                    device_names(&chain)
                ),
            ));
        };
        if device.key == me {
            return Err(Failure::new(
                USAGE,
                format!(
                    "{} is this device: revoke it from another of your devices",
                    display::inline(name)
                ),
            ));
        }
        let revoked = device.key;
        let head = self
            .append_own(&conn, |chain| {
                chain
                    .revoke_device_link(kez_client::now(), &key, revoked, reason)
                    .map_err(|err| {
                        Failure::new(USAGE, format!("cannot make the revocation: {err}"))
                    })
            })
            .await?;
        say!(
            "Revoked {} ({revoked}) at link {}: it signs nothing for you from now on.",
            display::inline(name),
            head.seq
        );
        Ok(())
    }

    /// A new paper key, shown once, confirmed by one word typed back, then added to the own
    /// chain as a device of kind `paper` (`paperkey`, and `register` unless `--no-paper-key`).
    /// Nothing changes unless the word is right. For `register`, a chain that already has an
    /// active paper key gets none (registering again is harmless), and with `--json` the words
    /// go to stderr, the terminal, not into the JSON.
    async fn paperkey(&self, name: Option<String>, asked: PaperKeyAsk) -> Result<(), Failure> {
        let key = self.key()?;
        let conn = self.connect().await?;
        let chain = conn
            .chain(&conn.identity())
            .await
            .map_err(Failure::client)?;
        if asked != PaperKeyAsk::Command
            && chain
                .active_devices()
                .any(|device| device.kind == DeviceKind::Paper)
        {
            return Ok(());
        }
        let say = |line: &str| {
            if asked == (PaperKeyAsk::Registration { json: true }) {
                tell!("{line}");
            } else {
                say!("{line}");
            }
        };
        let name = name.unwrap_or_else(|| {
            (1..)
                .map(|n| format!("paper{n}"))
                .find(|name| !chain.active_devices().any(|device| device.name == *name))
                .expect("some number is free")
        });
        if chain.active_devices().any(|device| device.name == name) {
            return Err(Failure::new(
                USAGE,
                format!(
                    "a device named {} is already on your chain; choose another with --name",
                    display::inline(&name)
                ),
            ));
        }
        let paper = PaperKey::generate();
        let link_on = |chain: &VerifiedChain| {
            chain
                .add_device_link(
                    kez_client::now(),
                    &key,
                    &paper.secret_key(),
                    &name,
                    DeviceKind::Paper,
                )
                .map_err(|err| {
                    Failure::new(
                        USAGE,
                        format!(
                            "cannot add a paper key named {}: {err}; choose another with --name",
                            display::inline(&name)
                        ),
                    )
                })
        };
        // Made once before anything is shown: a name the link cannot carry fails here. It is
        // made again on the chain as it is once the person has written the words down.
        link_on(&chain)?;
        say(&format!(
            "Your paper key {name}: write these {PAPER_KEY_WORDS} words down, in order, and keep the paper safe."
        ));
        say("It recovers your identity when every device is lost. Whoever has it can act as you.");
        say("kez-chat shows it only now and never stores it.");
        say("");
        for (row, words) in paper.words().chunks(6).enumerate() {
            let line: Vec<String> = words
                .iter()
                .enumerate()
                .map(|(column, word)| format!("{:>2} {word:<9}", row * 6 + column + 1))
                .collect();
            say(&format!("  {}", line.join(" ").trim_end()));
        }
        say("");
        let position = PaperKey::position_to_confirm();
        let mut confirmed = false;
        for _ in 0..3 {
            tell_part!("Type word {position} from your paper to confirm you wrote them down: ");
            let Some(answer) = term::read_line().await? else {
                break;
            };
            if paper.is_word(position, &answer) {
                confirmed = true;
                break;
            }
            tell!("That is not word {position}.");
        }
        if !confirmed {
            let what = match asked {
                PaperKeyAsk::Command => "nothing changed",
                PaperKeyAsk::Registration { .. } => {
                    "you are registered, without a paper key (scripts: register with --no-paper-key)"
                }
            };
            return Err(Failure::new(
                USAGE,
                format!(
                    "the paper key was not confirmed, so it was not added: {what}. Run `kez-chat paperkey` for a new one"
                ),
            ));
        }
        let head = self.append_own(&conn, link_on).await?;
        say(&format!(
            "Added paper key {name} ({}) to your sigchain at link {}.",
            paper.secret_key().public_key(),
            head.seq
        ));
        Ok(())
    }

    /// `recover @handle`: the paper key (typed on stdin) signs this fresh home's new key into
    /// the chain as a device, and revokes the named lost devices; every name is checked before
    /// anything is appended. The words are read into memory that is wiped, never written.
    async fn recover(
        mut self,
        handle: &str,
        name: Option<String>,
        revoke: &[String],
    ) -> Result<(), Failure> {
        if let Some(existing) = &self.config.handle {
            return Err(Failure::new(
                failure::CONFLICT,
                format!(
                    "this home is already {existing}'s; recover into a fresh home (--home DIR)"
                ),
            ));
        }
        let url = self.server()?;
        let url = kez_client::broker_urls(&url, self.plaintext())
            .map_err(|err| Failure::client(err.into()))?
            .join(",");
        tell_part!("Type the {PAPER_KEY_WORDS} words of your paper key, in order, on one line: ");
        // `recover` runs without a service (it makes the home), and reads its own stdin into a
        // buffer that is wiped.
        let mut typed = zeroize::Zeroizing::new(String::new());
        std::io::stdin().read_line(&mut typed).map_err(|err| {
            Failure::new(RUNTIME, format!("cannot read the words from stdin: {err}"))
        })?;
        let paper = PaperKey::parse(&typed).map_err(|err| {
            Failure::new(
                USAGE,
                format!("that is not your paper key: {err}; nothing changed"),
            )
        })?;
        let paper_key = Arc::new(paper.secret_key());
        drop(paper);
        let paper_conn = self
            .connect_to(&url, paper_key.clone())
            .await
            .map_err(|failure| {
                Failure::new(
                    failure.code,
                    format!(
                        "{}. If the server refused the paper key, it was revoked or the words are another paper key's; nothing changed",
                        failure.message
                    ),
                )
            })?;
        let info = paper_conn.server_info().await.map_err(Failure::client)?;
        let full = Handle::parse(handle, &info.domain).map_err(|err| {
            Failure::new(USAGE, format!("{handle:?} is not a valid handle: {err}"))
        })?;
        let profile = paper_conn.lookup(&full).await.map_err(Failure::client)?;
        let chain = paper_conn
            .chain(&profile.key)
            .await
            .map_err(Failure::client)?;
        let paper_pub = paper_key.public_key();
        if !chain.active_devices().any(|device| device.key == paper_pub) {
            return Err(Failure::new(
                failure::REFUSED,
                format!(
                    "this paper key is no active device of {full}: it was revoked, or it belongs to another identity; nothing changed"
                ),
            ));
        }
        let mut revoked = Vec::new();
        for lost in revoke {
            let device = chain
                .active_devices()
                .find(|device| device.name == *lost)
                .ok_or_else(|| {
                    Failure::new(
                        failure::NOT_FOUND,
                        format!(
                            "{full} has no active device named {}; the active ones are: {}; nothing changed",
                            display::inline(lost),
                            device_names(&chain)
                        ),
                    )
                })?;
            revoked.push((device.name.clone(), device.key));
        }
        let name = name.unwrap_or_else(|| {
            (1..)
                .map(|n| format!("device{n}"))
                .find(|name| !chain.active_devices().any(|device| device.name == *name))
                .expect("some number is free")
        });
        let (device_key, _) = self.home.key_or_create().map_err(Failure::home)?;
        let device_key = Arc::new(device_key);
        let link = chain
            .add_device_link(now(), &paper_key, &device_key, &name, DeviceKind::Cli)
            .map_err(|err| {
                Failure::new(
                    USAGE,
                    format!(
                        "cannot add this device as {}: {err}; choose another with --name",
                        display::inline(&name)
                    ),
                )
            })?;
        let head = append_device_link(&paper_conn, &link).await?;
        tell!(
            "added this home as device {} of {full} at link {}",
            display::inline(&name),
            head.seq
        );
        self.config.server = Some(url.clone());
        self.config.allow_plaintext |= self.plaintext_flag;
        self.config.handle = Some(full.to_string());
        self.config.identity = Some(profile.key);
        self.home.save_config(&self.config).map_err(Failure::home)?;
        for (lost, key) in revoked {
            let chain = paper_conn
                .chain(&profile.key)
                .await
                .map_err(Failure::client)?;
            let link = chain
                .revoke_device_link(now(), &device_key, key, Some("lost; revoked on recovery"))
                .map_err(|err| Failure::new(RUNTIME, format!("cannot revoke {lost}: {err}")))?;
            let head = append_device_link(&paper_conn, &link).await?;
            tell!("revoked {} at link {}", display::inline(&lost), head.seq);
        }
        let _ = paper_conn.close().await;
        say!(
            "This home is now {full}, device {}.",
            display::inline(&name)
        );
        say!(
            "If the paper may have been seen, revoke it (`kez-chat device revoke NAME`) and make a new one (`kez-chat paperkey`)."
        );
        Ok(())
    }

    /// `profile @name`: the registry's record and the verified sigchain, and how the key
    /// compares with the pinned one.
    async fn profile(&self, handle: &str, json: bool) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let profile = conn.lookup(&full).await.map_err(Failure::client)?;
        let chain = match conn.chain_at(&profile.key, full.domain()).await {
            Ok(chain) => Some(chain),
            Err(ClientError::Service(err)) if err.answer.code == 404 => None,
            Err(err) => return Err(Failure::client(err)),
        };
        drop(store);
        // Reading the manifest needs the file node (and the store, closed above: one lock).
        let files = match &chain {
            Some(chain) if chain.shared_files().is_some() => Some(self.visible_files(chain).await),
            _ => None,
        };
        let store = self.store()?;
        // A handle a contact lived under before it moved still names that contact.
        let pinned = store
            .contact_or_moved(&full.to_string())
            .map_err(Failure::store)?;
        let moved_to = chain
            .as_ref()
            .and_then(|chain| kez_core::moving::moved_to(chain, &full));
        let last_seen = |key: &PublicKey| store.last_seen(key).ok().flatten();
        let contact = match &pinned {
            None => "not in contacts",
            Some(c) if c.key == profile.key => "in contacts, key pinned",
            Some(_) => "in contacts, but the PINNED KEY DIFFERS from the server's",
        };
        if json {
            let sigchain = chain.as_ref().map(|chain| {
                json!({
                    "seq": chain.seq(),
                    "head": chain.head().to_string(),
                    "time": chain.time(),
                    "current_key": chain.current_key().to_string(),
                    "rotated": chain.current_key() != chain.chain_id(),
                    "devices": devices_json(chain.devices(), last_seen),
                    "olm_keys": chain.olm_keys(),
                    "endpoints": chain.endpoints().values().collect::<Vec<_>>(),
                    "claims": chain.claims(),
                    "shared_files": chain.shared_files(),
                    "unknown_ops": chain.unknown_ops(),
                })
            });
            print_json(&json!({
                "handle": profile.handle,
                "key": profile.key.to_string(),
                "registered_at": profile.registered_at,
                "in_contacts": pinned.is_some(),
                "pinned_key": pinned.map(|c| c.key.to_string()),
                "moved_to": moved_to.map(|handle| handle.to_string()),
                "sigchain": sigchain,
                // Shares nothing: no file visible, as for a manifest with nothing for us.
                "files": files.clone().unwrap_or_else(|| json!({ "visible": 0 })),
            }));
            return Ok(());
        }
        say!("{}  ({contact})", profile.handle);
        if let Some(to) = &moved_to {
            say!("moved to    {to} (its sigchain says so)");
        }
        say!("key         {}", profile.key);
        // Only what the pinned identity said itself, in a message its key signed.
        if pinned
            .as_ref()
            .is_some_and(|pinned| pinned.key == profile.key)
            && let Ok(Some((said, time))) = store.profile(&profile.key)
        {
            say!(
                "name        \"{}\"{} (from their signed message of {})",
                display::inline(&said.display_name),
                if said.avatar.is_some() {
                    ", with a picture"
                } else {
                    ""
                },
                clock(time)
            );
        }
        say!(
            "registered  {} (unix time {})",
            clock(profile.registered_at),
            profile.registered_at
        );
        let Some(chain) = chain else {
            say!("sigchain    none yet");
            return Ok(());
        };
        say!(
            "sigchain    verified: seq {}, head {}, last link {}",
            chain.seq(),
            chain.head(),
            clock(chain.time())
        );
        if chain.current_key() == chain.chain_id() {
            say!("rotations   none: the registering key still signs");
        } else {
            say!("rotations   rotated: now signed by {}", chain.current_key());
        }
        for device in chain.devices() {
            say!(
                "device      {}",
                device_line(device, last_seen(&device.key))
            );
        }
        let without_olm: Vec<String> = chain
            .devices()
            .iter()
            .filter(|device| {
                device.is_active()
                    && device.kind != kez_core::sigchain::DeviceKind::Paper
                    && chain.olm_key(&device.key).is_none()
            })
            .map(|device| display::inline(&device.name))
            .collect();
        if without_olm.is_empty() {
            say!("secrecy     forward secret: every device has an Olm key in the sigchain");
        } else {
            say!(
                "secrecy     not forward secret on {} (no Olm key in the sigchain yet: an older client)",
                without_olm.join(", ")
            );
        }
        if chain.endpoints().is_empty() {
            say!("endpoints   none");
        }
        for endpoint in chain.endpoints().values() {
            say!(
                "endpoint    {} ({}) {}",
                endpoint.name,
                endpoint.kind,
                display::inline(&endpoint.address)
            );
        }
        if chain.claims().is_empty() {
            say!("claims      none");
        }
        for claim in chain.claims() {
            say!(
                "claim       {} {} (proof: {})",
                claim.service,
                display::inline(&claim.identity),
                display::inline(&claim.proof)
            );
        }
        match (chain.shared_files(), &files) {
            (Some(committed), Some(files)) => match files.get("visible") {
                Some(visible) => say!(
                    "files       {visible} visible to you (manifest {} of {}); `kez-chat browse {}` lists them",
                    files["version"],
                    clock(files["time"].as_u64().unwrap_or_default()),
                    profile.handle
                ),
                None => say!(
                    "files       manifest {} (not fetched: {})",
                    committed.manifest,
                    display::inline(files["error"].as_str().unwrap_or("unknown error"))
                ),
            },
            _ => say!("files       none shared"),
        }
        for unknown in chain.unknown_ops() {
            say!(
                "note        link {} uses `{}`, unknown to this version",
                unknown.seq,
                unknown.op
            );
        }
        Ok(())
    }

    /// Whether this device's Olm key is bound in the own chain as last verified: without it
    /// nothing this device sends is forward secret (PROTOCOL.md §15.4).
    fn olm_bound_here(&self, store: &Store) -> Result<bool, Failure> {
        let me = self.key()?.public_key();
        Ok(store
            .own()
            .map_err(Failure::store)?
            .is_some_and(|own| own.olm_keys.contains_key(&me)))
    }

    /// `contacts`.
    fn contacts(&self, json: bool) -> Result<(), Failure> {
        let store = self.store()?;
        let contacts = store.contacts().map_err(Failure::store)?;
        let bound_here = self.olm_bound_here(&store)?;
        if json {
            let list: Vec<Value> = contacts
                .iter()
                .map(|c| {
                    let profile = store.profile(&c.key).ok().flatten();
                    json!({
                        "handle": c.handle,
                        "key": c.key.to_string(),
                        "current_key": c.current_key.to_string(),
                        "added_at": c.added_at,
                        "forward_secret": bound_here && c.forward_secret(),
                        "display_name": profile.as_ref().map(|(p, _)| p.display_name.clone()),
                        "avatar": profile.as_ref().and_then(|(p, _)| p.avatar.as_ref()).map(|a| json!({
                            "type": a.image_type.media_type(),
                            "bytes": a.data.len(),
                        })),
                    })
                })
                .collect();
            print_json(&Value::Array(list));
        } else if contacts.is_empty() {
            tell!("no contacts yet: add one with `kez-chat add @name`");
        } else {
            for contact in contacts {
                let name = chat::shown_name(&store, &contact.key)
                    .map(|name| format!("  {name}"))
                    .unwrap_or_default();
                if contact.current_key == contact.key {
                    say!("{}  {}{name}", contact.handle, contact.key);
                } else {
                    say!(
                        "{}  {} (rotated to {}){name}",
                        contact.handle,
                        contact.key,
                        contact.current_key
                    );
                }
            }
        }
        Ok(())
    }

    /// `send @name [text]`: the text from the arguments, else from stdin. The handle is looked
    /// up before every send; a new recipient is verified and pinned, a changed key refused.
    async fn send(&self, handle: &str, text: Vec<String>, json: bool) -> Result<(), Failure> {
        let text = if text.is_empty() {
            let input = term::read_all().await?;
            input.trim_end_matches(['\n', '\r']).to_owned()
        } else {
            text.join(" ")
        };
        if text.is_empty() {
            return Err(Failure::new(
                USAGE,
                "nothing to send: give the text as arguments or on stdin",
            ));
        }
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let contact = recipient(&conn, &store, self.handle()?, &full).await?;
        let sent = deliver(conn, &store, &contact, TEXT, text.as_bytes()).await?;
        let own_domain = self.handle()?.rsplit('@').next().unwrap_or_default();
        if full.domain() == own_domain {
            tell!("delivered to server for {}: id {}", contact.handle, sent.id);
        } else {
            // Another domain: the own server's outbox delivers it later, or bounces it.
            tell!(
                "handed to your server for {} (on {}): id {}; if it cannot be delivered, `kez-chat history {}` says so",
                contact.handle,
                full.domain(),
                sent.id,
                contact.handle
            );
        }
        if json {
            print_json(&json!({
                "id": sent.id.to_string(),
                "to": contact.handle,
                "to_key": sent.to.to_string(),
                "time": sent.time,
            }));
        } else {
            say!("{}", sent.id);
        }
        Ok(())
    }

    /// `inbox`: what the service received and nobody has seen, after it fetched what the inbox
    /// holds now; with `wait`, waits that long for a message when there is none.
    async fn inbox(&self, wait: Duration, json: bool) -> Result<(), Failure> {
        let mut events = self.held.subscribe();
        let _reading = self.held.reading();
        // Whether the server takes this key now: a refusal is the answer, not "no messages".
        let conn = self.connect().await?;
        self.still_a_device(&conn).await?;
        if !self.held.fetch_now().await? {
            return Err(Failure::new(RUNTIME, "`inbox` runs in the service"));
        }
        let mut shown = taken(&mut events);
        if shown.is_empty() && !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            while shown.is_empty() {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Ok(Event::Message(sender, message))) => {
                        shown.push((sender, message));
                        shown.extend(taken(&mut events));
                    }
                    Ok(Ok(
                        Event::Note(_)
                        | Event::Changed(_)
                        | Event::Live(_)
                        | Event::Undelivered(..),
                    )) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
        if json {
            print_json(&Value::Array(
                shown
                    .iter()
                    .map(|(sender, message)| message_json(sender, message))
                    .collect(),
            ));
        } else if shown.is_empty() {
            tell!("no new messages");
        } else {
            for (sender, message) in &shown {
                say!("{}", message_line(&sender_label(sender), message));
            }
        }
        Ok(())
    }

    /// Checks that this home's key is still an active device of the own identity, by the own
    /// chain as verified now: a connection made before a revocation works until the server
    /// ends it, and a revoked device must hear it at once, not read on.
    async fn still_a_device(&self, conn: &Connection) -> Result<(), Failure> {
        let store = self.store()?;
        let own = conn
            .own_devices(&store, self.handle()?)
            .await
            .map_err(Failure::client)?;
        let key = conn.public_key();
        if own.signs_with(&key) {
            return Ok(());
        }
        Err(Failure::new(
            failure::REFUSED,
            format!(
                "this device ({key}) was revoked from your sigchain (another of your devices lists it: `kez-chat devices`): the server refuses it from now on. Recover into a fresh home with your paper key (`kez-chat recover`) or pair a new device"
            ),
        ))
    }

    /// `listen`: the service's live events (messages as they arrive, a line when receiving
    /// stops and starts again) until Ctrl-C.
    async fn listen(&self, json: bool, all_events: bool) -> Result<(), Failure> {
        let mut events = self.held.subscribe();
        let _reading = (!all_events).then(|| self.held.reading());
        let conn = self.connect().await?;
        self.still_a_device(&conn).await?;
        let node = self.open_node().await?;
        tell!(
            "listening as {} (Ctrl-C to stop); serving your shared files at {}",
            self.config.handle.as_deref().unwrap_or_default(),
            node.provider()
        );
        match self.held.fetch_now().await {
            Ok(true) => {}
            Ok(false) => return Err(Failure::new(RUNTIME, "`listen` runs in the service")),
            // A broker restart now is also seen by the service's receiver: one line for both.
            Err(failure) => {
                if self.held.receiving_stopped() {
                    tell!(
                        "kez-chat: receiving stopped ({}); reconnecting, messages wait on the server meanwhile",
                        display::inline(&failure.message)
                    )
                }
            }
        }
        let stop = term::interrupted();
        tokio::pin!(stop);
        loop {
            let event = tokio::select! {
                why = &mut stop => {
                    if !matches!(why, "Ctrl-C" | "SIGTERM") {
                        tell!("kez-chat: listening ended: {why}");
                    }
                    break;
                }
                event = events.recv() => event,
            };
            match event {
                Ok(Event::Message(sender, message)) => {
                    if json {
                        say!("{}", message_json(&sender, &message));
                    } else {
                        say!("{}", message_line(&sender_label(&sender), &message));
                    }
                }
                Ok(Event::Undelivered(handle, note)) => {
                    if json {
                        say!("{}", chat::bounce_json(&handle, &note));
                    } else {
                        say!("{}", chat::undelivered_line(&handle, &note.undelivered));
                    }
                }
                Ok(Event::Note(note)) if all_events => say!("{}", json!({ "note": note })),
                Ok(Event::Note(note)) => tell!("{note}"),
                Ok(Event::Changed(peer)) if all_events => {
                    say!("{}", json!({ "changed": { "peer": peer.to_string() } }));
                }
                Ok(Event::Changed(_)) => {}
                Ok(Event::Live(notice)) if all_events => say!("{}", chat::live_json(&notice)),
                Ok(Event::Live(notice)) => {
                    if let Some(note) = chat::live_note(&notice) {
                        tell!("{note}");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => tell!(
                    "kez-chat: {missed} messages arrived faster than this view showed them; `kez-chat history` has every one"
                ),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        Ok(())
    }

    /// `history @name`: the conversation with a contact, or with someone not in the contacts
    /// whose key the server names for the handle (marked so).
    async fn history(&self, handle: &str, ids: bool, json: bool) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let (peer, in_contacts) = match store
            .contact_or_moved(&full.to_string())
            .map_err(Failure::store)?
        {
            Some(contact) => (contact.key, true),
            None => {
                let conn = self.connect().await?;
                let looked_up = conn.lookup(&full).await;
                (looked_up.map_err(Failure::client)?.key, false)
            }
        };
        let messages = store.messages(&peer).map_err(Failure::store)?;
        if in_contacts {
            self.mark_read(&store, &peer).await;
        }
        if json {
            let list: Vec<Value> = messages
                .iter()
                .map(|view| {
                    let mut value = chat::view_json(view, stored_json(&view.message));
                    value["in_contacts"] = json!(in_contacts);
                    value
                })
                .collect();
            print_json(&Value::Array(list));
            return Ok(());
        }
        if !in_contacts {
            tell!(
                "{full} is not in your contacts: shown are the messages signed by {peer}, the key the server names for {full}. `kez-chat add {full}` verifies and pins it"
            );
        }
        if let Some(contact) = store
            .contact_or_moved(&full.to_string())
            .map_err(Failure::store)?
        {
            tell!(
                "{}",
                chat::secrecy_note(&contact, self.olm_bound_here(&store)?)
            );
        }
        if messages.is_empty() {
            tell!("no messages with {full} yet");
        }
        let them = match in_contacts {
            true => full.to_string(),
            false => format!("(not in contacts) {full}"),
        };
        for view in &messages {
            let who = match view.message.direction {
                Direction::Incoming => them.as_str(),
                Direction::Outgoing => "you",
            };
            say!("{}", chat::view_line(who, view, ids));
            for undelivered in &view.undelivered {
                say!("{}", chat::undelivered_line(&full.to_string(), undelivered));
            }
        }
        Ok(())
    }

    /// `search WORDS`: the messages of every conversation that contain the words, in the order
    /// they were sent, each with whom it was exchanged.
    fn search(&self, words: &str, json: bool) -> Result<(), Failure> {
        if words.trim().is_empty() {
            return Err(Failure::new(
                USAGE,
                "nothing to search for: give some words",
            ));
        }
        let store = self.store()?;
        let found = store.search(words).map_err(Failure::store)?;
        let contacts = store.contacts().map_err(Failure::store)?;
        // The peer's handle when the conversation is a contact's (not one kept apart for a
        // key the contact retired), and how a line names the peer.
        let peer_of = |found: &kez_client::Found| {
            let contact = contacts.iter().find(|c| c.key == found.peer);
            let handle = contact.filter(|_| !found.retired).map(|c| c.handle.clone());
            let label = match (contact, found.retired) {
                (Some(c), false) => c.handle.clone(),
                (Some(c), true) => {
                    format!("(NOT {}: an old key of theirs) {}", c.handle, found.peer)
                }
                (None, _) => format!("(not in contacts) {}", found.peer),
            };
            (handle, label)
        };
        if json {
            let list: Vec<Value> = found
                .iter()
                .map(|found| {
                    let mut value = stored_json(&found.message);
                    if let Some(edited) = &found.edited {
                        value["text"] = json!(edited);
                        value["edited"] = json!(true);
                    }
                    value["peer"] = json!(found.peer.to_string());
                    value["peer_handle"] = json!(peer_of(found).0);
                    value
                })
                .collect();
            print_json(&Value::Array(list));
            return Ok(());
        }
        if found.is_empty() {
            tell!("no message contains {}", display::inline(words));
        }
        for found in &found {
            let (_, peer) = peer_of(found);
            let who = match found.message.direction {
                Direction::Incoming => peer,
                Direction::Outgoing => format!("you → {peer}"),
            };
            match &found.edited {
                Some(text) => say!(
                    "[{}] {who}: {} (edited)",
                    clock(found.message.time),
                    display::body(text)
                ),
                None => say!("{}", message_line(&who, &found.message)),
            }
        }
        Ok(())
    }

    /// `history` without a handle: every conversation, the latest first, with its last
    /// message and how many are unread.
    fn conversations(&self, json: bool) -> Result<(), Failure> {
        let store = self.store()?;
        let conversations = store.conversations().map_err(Failure::store)?;
        let contacts = store.contacts().map_err(Failure::store)?;
        let contact_of = |peer: &PublicKey| contacts.iter().find(|c| c.key == *peer);
        if json {
            let list: Vec<Value> = conversations
                .iter()
                .map(|conversation| {
                    let contact = contact_of(&conversation.peer);
                    let (handle, retired_key_of) = match (contact, conversation.retired) {
                        (Some(c), false) => (Some(c.handle.clone()), None),
                        (Some(c), true) => (None, Some(c.handle.clone())),
                        (None, _) => (None, None),
                    };
                    json!({
                        "peer": conversation.peer.to_string(),
                        "handle": handle,
                        "in_contacts": handle.is_some(),
                        "from_retired_key_of": retired_key_of,
                        "messages": conversation.messages,
                        "unread": conversation.unread,
                        "last": stored_json(&conversation.last),
                    })
                })
                .collect();
            print_json(&Value::Array(list));
            return Ok(());
        }
        if conversations.is_empty() {
            tell!("no conversations yet: `kez-chat send @name TEXT` starts one");
            return Ok(());
        }
        let rows: Vec<[String; 4]> = conversations
            .iter()
            .map(|conversation| {
                let who = match (contact_of(&conversation.peer), conversation.retired) {
                    (Some(c), false) => c.handle.clone(),
                    (Some(c), true) => format!(
                        "(NOT {}: an old key of theirs) {}",
                        c.handle, conversation.peer
                    ),
                    (None, _) => format!("(not in contacts) {}", conversation.peer),
                };
                let last = &conversation.last;
                let text = body_text(&last.id, &last.content_type, &last.body);
                let preview = match last.direction {
                    Direction::Outgoing => format!("you: {}", display::inline(&text)),
                    Direction::Incoming => display::inline(&text),
                };
                [
                    who,
                    clock(last.time),
                    format!(
                        "{}, {} unread",
                        display::plural(conversation.messages, "message"),
                        conversation.unread
                    ),
                    display::truncate(&preview, PREVIEW_CHARS),
                ]
            })
            .collect();
        for line in display::columns(&rows) {
            say!("{line}");
        }
        tell!("`kez-chat history @name` shows one; `kez-chat inbox` shows the unread");
        Ok(())
    }
}

/// Who sent a message, as far as the client knows.
#[derive(Debug, Clone)]
enum Sender {
    /// A contact (its pinned key signed the message).
    Contact(String),
    /// Not a contact: the handle the server names for the key, if any.
    Stranger(Option<String>, PublicKey),
    /// A key a contact (this handle) has rotated away from: not that contact any more.
    Retired(String, PublicKey),
    /// The own identity, from another own device: a copy of what it sent to this peer (a
    /// contact's handle, else the peer's key).
    You(String),
}

/// The handle of the contact with identity `key`, else the key.
fn contact_handle(store: &Store, key: &PublicKey) -> String {
    match store.contacts() {
        Ok(contacts) => contacts
            .into_iter()
            .find(|contact| contact.key == *key)
            .map_or_else(|| key.to_string(), |contact| contact.handle),
        Err(_) => key.to_string(),
    }
}

/// The messages among the events already there.
fn taken(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<(Sender, StoredMessage)> {
    let mut messages = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Event::Message(sender, message) = event {
            messages.push((sender, message));
        }
    }
    messages
}

impl Sender {
    /// Who sent `message`: for a received one, [`Sender::of`] its signer; for a copy of one
    /// sent from another own device, the own identity.
    async fn resolve(store: &Store, conn: &Connection, message: &StoredMessage) -> Sender {
        match message.direction {
            Direction::Incoming => Sender::of(store, conn, &message.from).await,
            Direction::Outgoing => Sender::You(contact_handle(store, &message.to)),
        }
    }

    /// The contact with `key`, or else the key's handle by `whois` (the message's signature
    /// proves the key; the handle is the server's word for it), asked of the server its
    /// messages came from when that was another domain's ([`Store::origin`]).
    async fn of(store: &Store, conn: &Connection, key: &PublicKey) -> Sender {
        if let Ok(Some(contact)) = store.contact_by_key(key) {
            return Sender::Contact(contact.handle);
        }
        if let Ok(Some(contact)) = store.contact_retired_key(key) {
            return Sender::Retired(contact.handle, *key);
        }
        let origin = store.origin(key).ok().flatten();
        let handle = conn
            .whois(key, origin.as_deref())
            .await
            .ok()
            .map(|profile| profile.handle.to_string());
        Sender::Stranger(handle, *key)
    }
}

/// Who sent a message, for people.
fn sender_label(sender: &Sender) -> String {
    match sender {
        Sender::Contact(handle) => handle.clone(),
        Sender::Stranger(Some(handle), key) => format!("(not in contacts) {handle} {key}"),
        Sender::Stranger(None, key) => format!("(not in contacts) {key}"),
        Sender::Retired(handle, key) => {
            format!("(NOT {handle}: signed by the old key {handle} rotated away from) {key}")
        }
        Sender::You(to) => format!("you → {to}"),
    }
}

/// One message as a line for people: `[time] who: text`.
fn message_line(who: &str, message: &StoredMessage) -> String {
    format!(
        "[{}] {who}: {}",
        clock(message.time),
        display::body(&body_text(
            &message.id,
            &message.content_type,
            &message.body
        ))
    )
}

/// One received message as JSON.
fn message_json(sender: &Sender, message: &StoredMessage) -> Value {
    let (handle, contact, retired_by) = match sender {
        Sender::Contact(handle) => (Some(handle.clone()), true, None),
        Sender::Stranger(handle, _) => (handle.clone(), false, None),
        Sender::Retired(handle, _) => (None, false, Some(handle.clone())),
        Sender::You(_) => (None, false, None),
    };
    let to_handle = match sender {
        Sender::You(to) => Some(to.clone()),
        _ => None,
    };
    json!({
        "id": message.id.to_string(),
        "direction": match message.direction {
            Direction::Incoming => "incoming",
            Direction::Outgoing => "outgoing",
        },
        "from": message.from.to_string(),
        "from_handle": handle,
        "to": message.to.to_string(),
        "to_handle": to_handle,
        "in_contacts": contact,
        "from_retired_key_of": retired_by,
        "time": message.time,
        "content_type": message.content_type,
        "text": body_text(&message.id, &message.content_type, &message.body),
    })
}

/// One stored message as JSON.
fn stored_json(message: &StoredMessage) -> Value {
    json!({
        "id": message.id.to_string(),
        "direction": match message.direction {
            Direction::Incoming => "incoming",
            Direction::Outgoing => "outgoing",
        },
        "from": message.from.to_string(),
        "to": message.to.to_string(),
        "time": message.time,
        "content_type": message.content_type,
        "text": body_text(&message.id, &message.content_type, &message.body),
    })
}

/// Verifies `full` before sending to it ([`Connection::verify_contact`]): pins a new
/// recipient, follows a rotation with a note, refuses a changed key loudly. Learns the own
/// devices too (`own` is the own handle), which get a copy of what is sent.
async fn recipient(
    conn: &Connection,
    store: &Store,
    own: &str,
    full: &Handle,
) -> Result<Contact, Failure> {
    conn.own_devices(store, own)
        .await
        .map_err(Failure::client)?;
    // Verified again only when its chain moved since (PROTOCOL.md §5.7: one directory read).
    let verified = match conn.check_contact(store, full).await {
        Ok(CheckedContact::Unchanged(contact)) => return Ok(contact),
        Ok(CheckedContact::Verified(verified)) => *verified,
        // Another domain's server that is down cannot say whether the chain moved: mail to the
        // devices verified before waits in the own server's outbox (and comes back as a bounce
        // if that server stays away), as an email would.
        Err(ClientError::Service(err)) if err.answer.name == "peer_unavailable" => {
            if let Some(pinned) = store.contact(&full.to_string()).map_err(Failure::store)? {
                tell!(
                    "{}'s server cannot be reached now: sending to the devices verified before (sigchain seq {}); your server keeps trying to deliver",
                    full.domain(),
                    pinned.chain_seq
                );
                return Ok(pinned);
            }
            return Err(Failure::send_refused(ClientError::Service(err), full));
        }
        Err(err) => return Err(Failure::send_refused(err, full)),
    };
    if let Some(moved) = &verified.moved {
        tell!("{}", moving::moved_note(moved));
    }
    let contact = verified.contact;
    if verified.change == PinChange::New {
        tell!(
            "{full} was not in your contacts: sigchain verified (seq {}), key {} pinned",
            verified.chain.seq(),
            contact.key
        );
    }
    for note in change_notes(
        &contact,
        verified.change,
        &verified.devices_changed,
        &verified.chain,
    ) {
        tell!("{note}");
    }
    Ok(contact)
}

/// The notes for what a contact's own chain changed since it was last verified: a version 1
/// chain's rotation (its devices are what the rotation made them), or a chain with devices'
/// device changes (which are what moves its current key).
fn change_notes(
    contact: &Contact,
    change: PinChange,
    devices_changed: &[trust::DeviceChange],
    chain: &kez_core::Sigchain,
) -> Vec<String> {
    if chain.version() == 1 {
        return match change {
            PinChange::Rotated { from } => vec![rotation_note(contact, &from)],
            PinChange::New | PinChange::Same => Vec::new(),
        };
    }
    devices_changed
        .iter()
        .map(|change| device_note(contact, change))
        .collect()
}

/// Tells that a contact's own sigchain added or revoked a device: the same identity, so a
/// note, not a warning. The device's name is the contact's text.
fn device_note(contact: &Contact, change: &trust::DeviceChange) -> String {
    let (what, device) = match change {
        trust::DeviceChange::Added(device) => ("added a device", device),
        trust::DeviceChange::Revoked(device) => ("revoked the device", device),
    };
    format!(
        "note: {} {what} {} ({}, {}); their sigchain says so, messages go to their active devices",
        contact.handle,
        display::inline(&device.name),
        device.kind,
        device.key
    )
}

/// Sends `body` to `contact`, closes the connection and records the message in the history.
async fn deliver(
    conn: Connection,
    store: &Store,
    contact: &Contact,
    content_type: &str,
    body: &[u8],
) -> Result<kez_client::Sent, Failure> {
    let sent = conn
        .send(contact, content_type, body)
        .await
        .map_err(Failure::client)?;
    store
        .record_outgoing(&sent, now())
        .map_err(Failure::store)?;
    for (device, reason) in &sent.missed {
        tell!(
            "note: the device {device} did not get it: {}",
            display::inline(reason)
        );
    }
    Ok(sent)
}

/// `add --json`'s name for a [`PinChange`].
fn change_name(change: PinChange) -> &'static str {
    match change {
        PinChange::New => "new",
        PinChange::Same => "same",
        PinChange::Rotated { .. } => "rotated",
    }
}

/// Tells that a contact's own sigchain rotated its key (an expected change, not a warning).
fn rotation_note(contact: &Contact, from: &PublicKey) -> String {
    format!(
        "note: {} rotated their key from {from} to {}; their sigchain proves it (the old key signed the new one), so it is followed",
        contact.handle, contact.current_key
    )
}

/// A message's content as text: the text itself, or for a file offer its name, size and how
/// to download it (never its key), or, for a content type this version does not know, that it
/// cannot show it (never dropped silently). Exact (for `--json`); lines
/// for people pass it through [`display::body`].
fn body_text(id: &MessageId, content_type: &str, body: &[u8]) -> String {
    match content_type {
        TEXT => String::from_utf8_lossy(body).into_owned(),
        FILE_OFFER_CONTENT_TYPE => match FileOffer::from_json(body) {
            Ok(offer) => format!(
                "offers the file {} ({}): `kez-chat download {}`",
                offer.name,
                files::bytes(offer.size),
                files::short_id(&id.to_string())
            ),
            Err(err) => format!("(a file offer that is not valid: {err})"),
        },
        kez_core::chat::REPLY_CONTENT_TYPE => {
            match kez_core::chat::ChatContent::decode(content_type, body) {
                Ok(kez_core::chat::ChatContent::Reply(reply)) => reply.text,
                _ => "(a reply that is not valid)".to_owned(),
            }
        }
        kez_client::UNDECRYPTABLE_CONTENT_TYPE => format!(
            "⚠ this message did not decrypt ({}); the sending device was asked to send it again",
            String::from_utf8_lossy(body)
        ),
        other => format!(
            "(a message this version cannot show: {other}, {} bytes)",
            body.len()
        ),
    }
}

/// `YYYY-MM-DD HH:MM:SS` in local time of a time in seconds since the epoch.
fn clock(time: u64) -> String {
    i64::try_from(time)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map(|utc| {
            utc.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| format!("unix time {time}"))
}

/// Appends a device link of the own chain; the head the server answers must be that link's,
/// or the link was not stored as sent.
pub(crate) async fn append_device_link(
    conn: &Connection,
    link: &SignedLink,
) -> Result<kez_client::ChainHead, Failure> {
    let head = conn.append(link.bytes()).await.map_err(Failure::client)?;
    stored_as_sent(head, link)
}

/// The head an append answered, which must be the appended link's.
fn stored_as_sent(
    head: kez_client::ChainHead,
    link: &SignedLink,
) -> Result<kez_client::ChainHead, Failure> {
    if head.head != link.hash() {
        return Err(Failure::new(
            RUNTIME,
            format!(
                "the server answered head {} for the link {}: it was not stored as sent; run `kez-chat devices` to see what your chain holds",
                head.head,
                link.hash()
            ),
        ));
    }
    Ok(head)
}

/// The names of a chain's active devices, for people.
fn device_names(chain: &kez_core::Sigchain) -> String {
    chain
        .active_devices()
        .map(|device| display::inline(&device.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One device on one line: its name (a peer's text, escaped), kind, key, history, and when
/// this home last had a message from it.
fn device_line(device: &Device, last_seen: Option<u64>) -> String {
    let mut state = match device.revoked {
        None => format!("added at link {}", device.added),
        Some(revoked) => format!("added at link {}, REVOKED at link {revoked}", device.added),
    };
    if let Some(time) = last_seen {
        state.push_str(&format!(", last seen {}", clock(time)));
    }
    format!(
        "{}  {}  {}  {state}",
        display::inline(&device.name),
        device.kind,
        device.key
    )
}

/// The devices as JSON: the state's own form (PROTOCOL.md §4.4), plus whether each is active
/// and `last_seen`: the sender's time of the latest message from it this home stored, if any.
fn devices_json(devices: &[Device], last_seen: impl Fn(&PublicKey) -> Option<u64>) -> Value {
    devices
        .iter()
        .map(|device| {
            json!({
                "key": device.key.to_string(),
                "name": device.name,
                "kind": device.kind.as_str(),
                "added": device.added,
                "revoked": device.revoked,
                "active": device.is_active(),
                "last_seen": last_seen(&device.key),
            })
        })
        .collect()
}

/// Prints JSON to stdout, one line.
fn print_json(value: &Value) {
    say!("{value}");
}
