//! KEZ identity core: keys, handles, the sigchain and the canonical bytes they are signed over.
//!
//! Pure by design: no I/O, no async runtime, no network. Everything here is deterministic given
//! its inputs (key generation aside, which reads the OS random number generator), so the
//! protocol can be tested exhaustively and reused by servers, clients and other languages' test
//! suites through the committed vectors.

pub mod canonical;
pub mod handle;
pub mod key;
pub mod registry;
pub mod sigchain;
pub mod subjects;

pub use handle::{Handle, HandleError};
pub use key::{KeyError, PublicKey, SecretKey, Signature};
pub use sigchain::{ChainError, ChainErrorKind, Op, Sigchain, SignedLink, UnsignedLink};
