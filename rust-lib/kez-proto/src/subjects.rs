//! NATS names derived from a key: the subjects, stream and consumer a user's client uses, and
//! the permission profiles that grant them. Both the server (which grants permissions on them)
//! and clients (which use them) take them from here, so the two cannot drift apart.
//! PROTOCOL.md §6.

use kez_core::key::PublicKey;

use crate::endpoint::{Endpoint, USER_SERVICES};

/// The JetStream stream holding every user's undelivered messages.
pub const INBOX_STREAM: &str = "KEZ_INBOX";
/// The stream's subjects: one inbox subject per user.
pub const INBOX_SUBJECTS: &str = "kez.inbox.*";

/// The JetStream API prefix clients use (async-nats `jetstream::with_prefix`). Users have no
/// JetStream of their own; the few API subjects they may use are imported from the server's
/// account under this prefix instead of `$JS.API`.
pub const JS_API_PREFIX: &str = "kez.js";

/// Where anyone publishes a message for `key`: `kez.inbox.<key hex>`.
pub fn inbox_subject(key: &PublicKey) -> String {
    format!("kez.inbox.{}", key.to_hex())
}

/// The durable pull consumer of `key`'s inbox: `inbox_<key hex>`.
pub fn inbox_consumer(key: &PublicKey) -> String {
    format!("inbox_{}", key.to_hex())
}

/// The reply-subject prefix `key`'s connection must use (`custom_inbox_prefix`):
/// `_INBOX.<key hex>`. Only that connection may subscribe below it.
pub fn reply_prefix(key: &PublicKey) -> String {
    format!("_INBOX.{}", key.to_hex())
}

/// What a key without a handle may publish (PROTOCOL.md §6.2): register, look handles up and
/// read the server's information. It may subscribe only to [`reply_prefix`].
pub fn unregistered_publish() -> Vec<String> {
    [Endpoint::Register, Endpoint::Lookup, Endpoint::Info]
        .map(|endpoint| endpoint.subject().to_owned())
        .into()
}

/// What `key`, registered, may publish (PROTOCOL.md §6.2): every kez service (mail through
/// `kez.mail.send`, never into an inbox directly), and the JetStream API of its own inbox
/// consumer only: pull, read its info, acknowledge. It may subscribe only to [`reply_prefix`].
pub fn registered_publish(key: &PublicKey) -> Vec<String> {
    let consumer = inbox_consumer(key);
    USER_SERVICES
        .iter()
        .map(|service| service.wildcard())
        .chain([
            format!("{JS_API_PREFIX}.CONSUMER.MSG.NEXT.{INBOX_STREAM}.{consumer}"),
            format!("{JS_API_PREFIX}.CONSUMER.INFO.{INBOX_STREAM}.{consumer}"),
            format!("$JS.ACK.{INBOX_STREAM}.{consumer}.>"),
        ])
        .collect()
}

/// What any key may subscribe to: replies under its own [`reply_prefix`].
pub fn allowed_subscribe(key: &PublicKey) -> Vec<String> {
    vec![format!("{}.>", reply_prefix(key))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kez_core::SecretKey;

    #[test]
    fn names_embed_the_key_hex() {
        let key = SecretKey::from_seed(&[3; 32]).public_key();
        let hex = key.to_hex();
        assert_eq!(inbox_subject(&key), format!("kez.inbox.{hex}"));
        assert_eq!(inbox_consumer(&key), format!("inbox_{hex}"));
        assert_eq!(reply_prefix(&key), format!("_INBOX.{hex}"));
        assert_eq!(allowed_subscribe(&key), [format!("_INBOX.{hex}.>")]);
    }

    #[test]
    fn a_registered_key_reaches_its_own_consumer_and_no_inbox() {
        let key = SecretKey::from_seed(&[3; 32]).public_key();
        let hex = key.to_hex();
        let allowed = registered_publish(&key);
        assert!(allowed.contains(&"kez.mail.>".to_owned()));
        assert!(allowed.contains(&format!("$JS.ACK.KEZ_INBOX.inbox_{hex}.>")));
        assert!(
            allowed
                .iter()
                .all(|subject| !subject.starts_with("kez.inbox"))
        );
        assert_eq!(
            unregistered_publish(),
            [Endpoint::Register, Endpoint::Lookup, Endpoint::Info].map(Endpoint::subject)
        );
    }
}
