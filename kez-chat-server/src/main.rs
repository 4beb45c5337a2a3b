//! `kez-chat-server`: the kez-chat home server.
//!
//! Its services (registry, sigchain, auth callout, WebFinger) land with their issues; until then
//! the binary only describes itself.

use clap::Parser;

/// The kez-chat home server: handle registry and sigchain services over NATS, the NATS auth
/// callout that turns a user's KEZ key into their NATS credential, and WebFinger.
///
/// Not yet functional: the services arrive with the server issues. See README.md for status.
#[derive(Parser)]
#[command(version, arg_required_else_help = true)]
struct Cli {}

fn main() {
    Cli::parse();
}
