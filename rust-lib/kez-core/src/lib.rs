//! KEZ identity core: keys, handles, the sigchain and the canonical bytes they are signed over.
//!
//! Pure by design: no I/O, no async runtime, no network. Everything here is deterministic given
//! its inputs (key generation aside, which reads the OS random number generator), so the
//! protocol can be tested exhaustively and reused by servers, clients and other languages' test
//! suites through the committed vectors.

/// serde through the type's one text form (`Display` / `FromStr`), so JSON carries exactly the
/// strings PROTOCOL.md specifies and parsing is as strict as `FromStr`.
macro_rules! serde_as_text {
    ($type:ty) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod canonical;
#[cfg(test)]
mod committed_vectors;
pub mod connect;
pub mod envelope;
pub mod file;
pub mod handle;
pub mod key;
pub mod manifest;
pub mod provider;
pub mod sigchain;

pub use handle::{Handle, HandleError};
pub use key::{KeyError, PublicKey, SecretKey, Signature, SignatureDomain};
pub use sigchain::{ChainError, ChainErrorKind, Op, Sigchain, SignedLink, UnsignedLink};
