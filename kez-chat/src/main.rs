//! `kez-chat`: the kez-chat command-line client.
//!
//! Commands (register, add, send, listen, share, browse) land with the client issue; until then
//! the binary only describes itself.

use clap::Parser;

/// kez-chat: end-to-end encrypted chat and peer-to-peer file sharing for `@name@domain` handles
/// backed by an ed25519 KEZ key.
///
/// Not yet functional: the commands arrive with the client issue. See README.md for status.
#[derive(Parser)]
#[command(version, arg_required_else_help = true)]
struct Cli {}

fn main() {
    Cli::parse();
}
