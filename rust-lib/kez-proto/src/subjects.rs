//! NATS names derived from a key: the inbox stream and subjects, the new-mail notification, the
//! reply prefix, and the permission profiles that grant them. Both the server (which grants
//! permissions on them) and clients (which use them) take them from here, so the two cannot
//! drift apart. PROTOCOL.md §6.
//!
//! Inboxes are per device: `kez.inbox.<identity hex>.<device hex>`. An identity's own key (its
//! chain id) is a device of it too, with the same hex twice. Live notices (typing, presence:
//! PROTOCOL.md §8.6) go to devices the same way, on `kez.live.<identity hex>.<device hex>`, over
//! core NATS only.

use kez_core::key::PublicKey;

use crate::directory::DIRECT_GET_SUBJECTS;
use crate::endpoint::{Endpoint, USER_SERVICES};

/// The JetStream stream holding every device's undelivered messages (limits retention, no
/// consumers: the server reads and purges it for the caller, PROTOCOL.md §6.3).
pub const MAIL_STREAM: &str = "KEZ_MAIL";
/// The stream's subjects: one inbox subject per device.
pub const INBOX_SUBJECTS: &str = "kez.inbox.*.*";
/// The stream republishes the headers of every stored message here (`kez.new.<identity
/// hex>.<device hex>`), where only that device may subscribe.
pub const NEW_MAIL_DESTINATION: &str = "kez.new.{{wildcard(1)}}.{{wildcard(2)}}";
/// Every new-mail notification subject.
pub const NEW_MAIL_SUBJECTS: &str = "kez.new.*.*";

/// Every live-notice subject (`kez.live.<identity hex>.<device hex>`): what a chat profile may
/// publish to. Core NATS only: users live in an account without JetStream, and the subjects
/// share no first tokens with [`INBOX_SUBJECTS`], so no stream ever holds a notice.
pub const LIVE_SUBJECTS: &str = "kez.live.*.*";

/// Where `device`, a device of `identity`, hears live notices (typing, presence; PROTOCOL.md
/// §8.6): `kez.live.<identity hex>.<device hex>`. One subject per device, like the inbox,
/// because a sender seals one envelope per recipient device (§6.5 rule 3): each device gets
/// only the envelope it can open, and only that device may subscribe.
pub fn live_subject(identity: &PublicKey, device: &PublicKey) -> String {
    format!("kez.live.{}.{}", identity.to_hex(), device.to_hex())
}

/// The inbox of `device`, a device of `identity`: `kez.inbox.<identity hex>.<device hex>`.
pub fn inbox_subject(identity: &PublicKey, device: &PublicKey) -> String {
    format!("kez.inbox.{}.{}", identity.to_hex(), device.to_hex())
}

/// Where the new-mail notifications of `device`'s inbox arrive:
/// `kez.new.<identity hex>.<device hex>`.
pub fn new_mail_subject(identity: &PublicKey, device: &PublicKey) -> String {
    format!("kez.new.{}.{}", identity.to_hex(), device.to_hex())
}

/// The reply-subject prefix `key`'s connection must use (`custom_inbox_prefix`):
/// `_INBOX.<key hex>`. Only that connection may subscribe below it.
pub fn reply_prefix(key: &PublicKey) -> String {
    format!("_INBOX.{}", key.to_hex())
}

/// What a key without a handle may publish (PROTOCOL.md §6.2): register, look handles up
/// (also in the directory, [`DIRECT_GET_SUBJECTS`]), read the server's information, and its
/// own pairing exchange through the relay (which lets it touch only the slots of its own key,
/// §5.6). It may subscribe only to [`reply_prefix`].
pub fn unregistered_publish() -> Vec<String> {
    [
        Endpoint::Register,
        Endpoint::Lookup,
        Endpoint::Info,
        Endpoint::PairPut,
        Endpoint::PairGet,
    ]
    .map(|endpoint| endpoint.subject().to_owned())
    .into_iter()
    .chain([DIRECT_GET_SUBJECTS.to_owned()])
    .collect()
}

/// What a registered key (or an active device) may publish (PROTOCOL.md §6.2): every kez
/// service, the live notices of anyone's devices ([`LIVE_SUBJECTS`]) and the directory's
/// direct get of one subject ([`DIRECT_GET_SUBJECTS`]), nothing else. Mail goes in through
/// `kez.mail.send` and out through `kez.mail.fetch`; no user reaches any other part of the
/// JetStream API.
pub fn registered_publish() -> Vec<String> {
    USER_SERVICES
        .iter()
        .map(|service| service.wildcard())
        .chain([LIVE_SUBJECTS.to_owned(), DIRECT_GET_SUBJECTS.to_owned()])
        .collect()
}

/// What a peer server may publish on this broker (PROTOCOL.md §14.2), the federation
/// subjects: hand over mail for users here, and read what anyone may read of them (lookups,
/// whois, sigchains, server information), and claim a device's prekey for one of its users
/// (PROTOCOL.md §15.2). Nothing that changes state but mail and claims, which are checked and
/// limited like any other.
pub fn peer_publish() -> Vec<String> {
    [
        Endpoint::MailDeliver,
        Endpoint::Lookup,
        Endpoint::Whois,
        Endpoint::GetChain,
        Endpoint::Head,
        Endpoint::Info,
        Endpoint::KeysClaim,
    ]
    .map(|endpoint| endpoint.subject().to_owned())
    .into()
}

/// What a key without a handle may subscribe to: replies under its own [`reply_prefix`].
pub fn unregistered_subscribe(key: &PublicKey) -> Vec<String> {
    vec![format!("{}.>", reply_prefix(key))]
}

/// What `key`, registered, may subscribe to: replies under its own [`reply_prefix`], the
/// new-mail notifications of its own inbox and its own live notices (the identity's key is a
/// device of it).
pub fn registered_subscribe(key: &PublicKey) -> Vec<String> {
    device_subscribe(key, key)
}

/// What `device`, an active device of `identity`, may subscribe to: replies under the device's
/// own [`reply_prefix`], the new-mail notifications of the device's own inbox and the
/// device's own live notices ([`live_subject`]).
pub fn device_subscribe(identity: &PublicKey, device: &PublicKey) -> Vec<String> {
    vec![
        format!("{}.>", reply_prefix(device)),
        new_mail_subject(identity, device),
        live_subject(identity, device),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kez_core::SecretKey;

    #[test]
    fn names_embed_the_key_hex() {
        let key = SecretKey::from_seed(&[3; 32]).public_key();
        let device = SecretKey::from_seed(&[4; 32]).public_key();
        let (hex, dev) = (key.to_hex(), device.to_hex());
        assert_eq!(
            inbox_subject(&key, &device),
            format!("kez.inbox.{hex}.{dev}")
        );
        assert_eq!(
            new_mail_subject(&key, &device),
            format!("kez.new.{hex}.{dev}")
        );
        assert_eq!(live_subject(&key, &device), format!("kez.live.{hex}.{dev}"));
        assert_eq!(reply_prefix(&key), format!("_INBOX.{hex}"));
        assert_eq!(unregistered_subscribe(&key), [format!("_INBOX.{hex}.>")]);
        assert_eq!(
            registered_subscribe(&key),
            [
                format!("_INBOX.{hex}.>"),
                format!("kez.new.{hex}.{hex}"),
                format!("kez.live.{hex}.{hex}")
            ]
        );
        assert_eq!(
            device_subscribe(&key, &device),
            [
                format!("_INBOX.{dev}.>"),
                format!("kez.new.{hex}.{dev}"),
                format!("kez.live.{hex}.{dev}")
            ]
        );
    }

    #[test]
    fn a_registered_key_reaches_the_services_only() {
        let allowed = registered_publish();
        assert!(allowed.contains(&"kez.mail.>".to_owned()));
        assert!(allowed.contains(&LIVE_SUBJECTS.to_owned()));
        // Of JetStream, only the directory's direct get of one subject (PROTOCOL.md §5.7).
        assert!(
            allowed.iter().all(|subject| (subject.starts_with("kez.")
                && !subject.starts_with("kez.inbox"))
                || subject == DIRECT_GET_SUBJECTS),
            "{allowed:?}"
        );
        assert!(allowed.contains(&DIRECT_GET_SUBJECTS.to_owned()));
        assert_eq!(
            unregistered_publish(),
            [
                Endpoint::Register.subject(),
                Endpoint::Lookup.subject(),
                Endpoint::Info.subject(),
                Endpoint::PairPut.subject(),
                Endpoint::PairGet.subject(),
                DIRECT_GET_SUBJECTS,
            ]
        );
        assert!(
            !unregistered_publish()
                .iter()
                .any(|s| s.starts_with("kez.live")),
            "the narrow profile sends no live notices"
        );
    }

    #[test]
    fn live_notices_share_no_subject_with_the_mail_stream_or_a_service() {
        // The first two tokens differ from every stored or service subject, so no wildcard of
        // one matches the other.
        let live_prefix = "kez.live.";
        for other in [INBOX_SUBJECTS, NEW_MAIL_SUBJECTS] {
            assert!(!other.starts_with(live_prefix), "{other}");
        }
        assert!(LIVE_SUBJECTS.starts_with(live_prefix));
        for service in USER_SERVICES {
            let wildcard = service.wildcard();
            assert!(!wildcard.starts_with(live_prefix), "{wildcard}");
            assert_ne!(
                wildcard, "kez.>",
                "a service wildcard would cover live notices"
            );
        }
        for endpoint in Endpoint::ALL {
            assert!(!endpoint.subject().starts_with(live_prefix), "{endpoint:?}");
        }
    }
}
