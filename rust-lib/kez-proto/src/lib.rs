//! The kez-chat wire contract: every subject of the home server, every request and answer (one
//! type, encoded by one side and decoded by the other), the error answers and their codes, and
//! the decoder the server runs on every request body. PROTOCOL.md specifies the bytes.
//!
//! Pure, like kez-core: no I/O, no async runtime, no network. The server, the client and the
//! fuzz targets all use this crate, so the contract is written once; adding an endpoint starts
//! in [`endpoint`] and [`request`].

pub mod answer;
pub mod directory;
pub mod endpoint;
pub mod error;
pub mod federation;
pub mod keys;
pub mod mail;
pub mod pair;
pub mod pin;
pub mod reconnect;
pub mod registry;
pub mod request;
pub mod subjects;
pub mod webfinger;

pub use endpoint::Endpoint;
pub use error::ErrorAnswer;
pub use request::{Request, decode};
