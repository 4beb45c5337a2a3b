//! NATS names derived from a key: the subjects, stream and consumer a user's client uses.
//! Both the server (which grants permissions on them) and clients (which use them) take them
//! from here, so the two cannot drift apart. PROTOCOL.md §6.

use crate::key::PublicKey;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    #[test]
    fn names_embed_the_key_hex() {
        let key = SecretKey::from_seed(&[3; 32]).public_key();
        let hex = key.to_hex();
        assert_eq!(inbox_subject(&key), format!("kez.inbox.{hex}"));
        assert_eq!(inbox_consumer(&key), format!("inbox_{hex}"));
        assert_eq!(reply_prefix(&key), format!("_INBOX.{hex}"));
    }
}
