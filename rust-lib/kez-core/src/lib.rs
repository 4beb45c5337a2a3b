//! KEZ identity core: keys, handles, the sigchain and the canonical bytes they are signed over.
//!
//! Pure by design: no I/O, no async runtime, no network. Everything here is deterministic given
//! its inputs (key generation aside, which reads the OS random number generator), so the
//! protocol can be tested exhaustively and reused by servers, clients and other languages' test
//! suites through the committed vectors.
//!
//! A sigchain started, grown and verified again from its links, a contact's chain checked
//! against what was pinned, and a message sealed for a key and opened by it:
//!
//! ```
//! use kez_core::sigchain::Endpoint;
//! use kez_core::trust::{PinChange, VerifiedChain, check_pin};
//! use kez_core::{Op, SecretKey, Sigchain, UnsignedLink, envelope};
//!
//! let alice = SecretKey::generate();
//! let nats = Endpoint {
//!     name: "nats".into(),
//!     kind: "nats".into(),
//!     address: "tls://kez.lat:4222".into(),
//! };
//! let first = UnsignedLink::first(alice.public_key(), 1_767_225_600, Op::AddEndpoint(nats))
//!     .sign(&alice)?;
//! let mut chain = Sigchain::start(first.bytes())?;
//! let removal = Op::RemoveEndpoint { name: "nats".into() };
//! let second = chain.next_link(1_767_225_660, removal).sign(&alice)?;
//! chain.append(second.bytes())?;
//! assert_eq!(Sigchain::verify(&[first.bytes(), second.bytes()])?, chain);
//!
//! // bob meets alice's chain for the first time, then a copy that is one link shorter.
//! let grown = VerifiedChain::verify(&[first.bytes(), second.bytes()])?;
//! let (pinned, change) = check_pin(None, &grown)?;
//! assert_eq!(change, PinChange::New);
//! let older = VerifiedChain::verify(&[first.bytes()])?;
//! assert!(check_pin(Some(&pinned), &older).is_err(), "a rollback is refused");
//!
//! let bob = SecretKey::generate();
//! let (_id, sealed) = envelope::seal(&alice, &bob.public_key(), "text", b"hi", 1_767_225_700)?;
//! let message = envelope::open(&bob, &sealed)?;
//! assert_eq!((message.from, message.body.as_slice()), (alice.public_key(), &b"hi"[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
pub mod chat;
#[cfg(test)]
mod committed_vectors;
pub mod connect;
pub mod copy;
pub mod envelope;
pub mod file;
pub mod handle;
pub mod key;
pub mod manifest;
pub mod moving;
pub mod olm;
pub mod pair;
pub mod paper;
pub mod prekey;
pub mod provider;
pub mod sigchain;
pub mod trust;

pub use handle::{Handle, HandleError};
pub use key::{KeyError, PublicKey, SecretKey, Signature, SignatureDomain};
pub use sigchain::{ChainError, ChainErrorKind, Op, Sigchain, SignedLink, UnsignedLink};
