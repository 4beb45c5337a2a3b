//! Request bodies tests send again and again.

use std::time::{SystemTime, UNIX_EPOCH};

use kez_core::sigchain::Endpoint;
use kez_core::{Handle, Op, SecretKey};
use kez_proto::registry::RegistrationRequest;

use crate::kez_server::TEST_DOMAIN;

/// Seconds since the Unix epoch, as the server's clock will read them.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs()
}

/// A `kez.registry.register` body: `key` claims `name` on [`TEST_DOMAIN`], signed now.
pub fn registration(key: &SecretKey, name: &str) -> Vec<u8> {
    let handle = Handle::parse(name, TEST_DOMAIN).expect("a valid test handle");
    serde_json::to_vec(&RegistrationRequest::sign(key, &handle, now())).expect("serialises")
}

/// An `add_endpoint` operation for a NATS endpoint called `name`.
pub fn nats_endpoint(name: &str) -> Op {
    Op::AddEndpoint(Endpoint {
        name: name.into(),
        kind: "nats".into(),
        address: "nats://127.0.0.1:4222".into(),
    })
}

/// A `kez.mail.send` body: `envelope` (any bytes: the server never opens it) for `to`'s inbox
/// under the message id `id`.
pub fn mail(to: &kez_core::PublicKey, id: [u8; 16], envelope: &[u8]) -> Vec<u8> {
    kez_proto::mail::SendRequest::encode(
        to,
        &kez_core::envelope::MessageId::from_bytes(id),
        envelope,
    )
}
