//! Forward secrecy on the wire (PROTOCOL.md §15): publishing this device's prekeys and binding
//! its Olm key in the own chain, sealing with Olm to the devices whose chains bind one,
//! asking a sender again for what did not decrypt, and answering such requests.

use std::collections::{BTreeSet, HashMap};

use kez_core::PublicKey;
use kez_core::chat::{MAX_RESEND_IDS, RESEND_CONTENT_TYPE, Resend};
use kez_core::copy::{SENT_COPY_CONTENT_TYPE, SentCopy};
use kez_core::envelope::{self, Message, MessageId};
use kez_core::prekey::{OlmKey, PrekeyKind};
use kez_core::sigchain::Op;
use kez_proto::Endpoint;
use kez_proto::keys::PublishRequest;

use super::{ClientError, Connection, handle_domain, mail_request, now};
use crate::store::{Contact, OlmTarget, SealTicket, Store, StoreError, StoredMessage};

/// One-time keys the key service should hold for this device: published up to this many...
const ONE_TIME_KEYS: usize = 50;
/// ...again whenever fewer than this many are left.
const REFILL_BELOW: usize = 25;

/// Whether this device seals forward-secret messages, and if not, why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardSecrecy {
    /// Prekeys are published and the own chain binds this device's Olm key.
    Ready,
    /// The home server has no key service (an older server, or its broker configuration
    /// lacks the `kez.keys` import): messages are sealed as before.
    Unavailable(String),
}

/// What [`Connection::seal_for`] sealed: an envelope (or why not) per recipient, in their
/// order, and what must be on disk before any of them leaves.
pub(super) struct Sealed {
    pub(super) envelopes: Vec<(PublicKey, Result<Vec<u8>, String>)>,
    pub(super) durable: Durable,
}

/// The sending sessions an Olm seal saved without a disk sync, if any.
#[derive(Clone)]
pub(super) struct Durable(Option<(Store, SealTicket)>);

impl Durable {
    /// Waits until the sessions are on disk (one sync shared by concurrent sends).
    pub(super) async fn wait(self) -> Result<(), ClientError> {
        let Some((store, ticket)) = self.0 else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || store.make_durable(ticket))
            .await
            .map_err(|err| ClientError::BadAnswer {
                subject: Endpoint::MailSend.subject().to_owned(),
                reason: format!("saving the sending sessions failed: {err}"),
            })?
            .map_err(ClientError::from)
    }
}

/// A device to seal one message for: its key, its bound Olm key if any, and the domain its
/// key service is asked through (`None`: the home server's own users).
pub(super) struct Recipient {
    pub(super) device: PublicKey,
    pub(super) olm: Option<OlmKey>,
    pub(super) domain: Option<String>,
}

impl Connection {
    /// Makes this device able to receive and send forward-secret messages: the Olm account
    /// (made on first use), its prekeys at the key service (topped up), and its Olm identity
    /// key bound to this device in the own chain (`set_olm_key`, appended when missing).
    /// The key is bound only after prekeys are published, so nobody finds the key without
    /// prekeys to start a session with. Afterwards [`Connection::publish`] seals with Olm to
    /// every device whose chain binds a key. Call it where the own chain is written (one
    /// writer at a time).
    pub async fn prepare_forward_secrecy(
        &self,
        store: &Store,
    ) -> Result<ForwardSecrecy, ClientError> {
        let identity = store.olm_identity(&self.key)?;
        let count = match self.keys_count().await {
            Ok(count) => count,
            Err(ClientError::Request { source, .. }) => {
                return Ok(ForwardSecrecy::Unavailable(format!(
                    "the home server has no key service ({source})"
                )));
            }
            Err(err) => return Err(err),
        };
        let stale = count.identity_key != Some(identity);
        let left = if stale { 0 } else { count.one_time as usize };
        if stale || left < REFILL_BELOW || !count.fallback {
            self.publish_prekeys(
                store,
                ONE_TIME_KEYS - left.min(ONE_TIME_KEYS),
                stale || !count.fallback,
            )
            .await?;
        }
        let chain = self.chain(&self.identity).await?;
        let me = self.key.public_key();
        if chain.olm_key(&me) != Some(identity) {
            let link = chain
                .next_link_by(me, now(), Op::SetOlmKey { key: identity })
                .sign(&self.key)
                .map_err(|err| ClientError::BadAnswer {
                    subject: Endpoint::Append.subject().to_owned(),
                    reason: format!("cannot sign the link that binds the Olm key: {err}"),
                })?;
            self.append(link.bytes()).await?;
            tracing::info!(olm = %identity, "bound this device's Olm key in the own sigchain");
        }
        let _ = self.secrecy.set(store.clone());
        Ok(ForwardSecrecy::Ready)
    }

    /// Makes `one_time` one-time keys (and a fallback key when `fallback`), keeps them in
    /// the store, then publishes them.
    async fn publish_prekeys(
        &self,
        store: &Store,
        one_time: usize,
        fallback: bool,
    ) -> Result<(), ClientError> {
        let prekeys = store.new_prekeys(&self.key, one_time, fallback)?;
        let request = PublishRequest {
            identity_key: prekeys.identity,
            one_time: prekeys.one_time,
            fallback: prekeys.fallback,
        };
        let answer = self.keys_publish(&request).await?;
        tracing::debug!(
            one_time = answer.one_time,
            fallback = answer.fallback,
            "published prekeys"
        );
        Ok(())
    }

    /// After pre-key messages made sessions: publishes a new fallback key (one a claimer may
    /// have got is not kept at the service for longer than that; the account still opens
    /// pre-key messages in flight made from the one before) and more one-time keys when the
    /// service holds fewer than it should.
    pub(super) async fn refill_prekeys(&self, store: &Store) -> Result<(), ClientError> {
        let left = usize::try_from(self.keys_count().await?.one_time).unwrap_or(usize::MAX);
        let one_time = if left < REFILL_BELOW {
            ONE_TIME_KEYS - left
        } else {
            0
        };
        self.publish_prekeys(store, one_time, true).await
    }

    /// A prekey of `device` claimed from the key service (through the home server, for
    /// another `domain`) and checked: the answer is for the device asked, names the Olm key
    /// its chain binds, and the device signed the prekey for that key.
    async fn claim_prekey(
        &self,
        device: &PublicKey,
        identity: &OlmKey,
        domain: Option<&str>,
    ) -> Result<OlmKey, String> {
        let answer = self
            .keys_claim(device, domain)
            .await
            .map_err(|err| format!("no prekey to start a forward-secret session: {err}"))?;
        if answer.device != *device || answer.identity_key != *identity {
            return Err(
                "the key service answered with another device's or another Olm key's prekey".into(),
            );
        }
        answer
            .prekey
            .verify(device, identity)
            .map_err(|err| format!("the claimed prekey: {err}"))?;
        if answer.prekey.kind == PrekeyKind::Fallback {
            tracing::debug!(%device, "got the device's fallback key (no one-time key left)");
        }
        Ok(answer.prekey.key)
    }

    /// Seals one message (`id`, `time`) for each of `recipients`: with Olm (envelope version
    /// 2) to a device whose chain binds an Olm key, once forward secrecy is prepared, making
    /// a session from a claimed prekey where none is (or always, with `new_session`);
    /// otherwise with envelope version 1. A device that cannot get an Olm envelope gets its
    /// reason, never a version 1 one instead.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn seal_for(
        &self,
        recipients: &[Recipient],
        content_type: &str,
        body: &[u8],
        time: u64,
        id: MessageId,
        new_session: bool,
    ) -> Result<Sealed, ClientError> {
        let store = self.secrecy.get();
        let mut ticket = None;
        let mut sealed: HashMap<PublicKey, Result<Vec<u8>, String>> = HashMap::new();
        let mut olm = Vec::new();
        for recipient in recipients {
            match (store, recipient.olm) {
                (Some(_), Some(identity)) => olm.push((recipient, identity)),
                _ => {
                    let envelope = envelope::seal_with_id(
                        &self.key,
                        &recipient.device,
                        content_type,
                        body,
                        time,
                        id,
                    )
                    .map_err(ClientError::Seal)?;
                    sealed.insert(recipient.device, Ok(envelope));
                }
            }
        }
        if let Some(store) = store
            && !olm.is_empty()
        {
            let pairs: Vec<(PublicKey, OlmKey)> = olm
                .iter()
                .map(|(recipient, identity)| (recipient.device, *identity))
                .collect();
            let missing: BTreeSet<PublicKey> = if new_session {
                pairs.iter().map(|(device, _)| *device).collect()
            } else {
                store.without_session(&pairs)?.into_iter().collect()
            };
            let claims = futures::future::join_all(
                olm.iter()
                    .filter(|(recipient, _)| missing.contains(&recipient.device))
                    .map(|(recipient, identity)| async move {
                        let claimed = self
                            .claim_prekey(&recipient.device, identity, recipient.domain.as_deref())
                            .await;
                        (recipient.device, claimed)
                    }),
            )
            .await;
            let mut prekeys = HashMap::new();
            for (device, claimed) in claims {
                match claimed {
                    Ok(prekey) => {
                        prekeys.insert(device, prekey);
                    }
                    Err(reason) => {
                        sealed.insert(device, Err(reason));
                    }
                }
            }
            let targets: Vec<OlmTarget> = olm
                .iter()
                .filter(|(recipient, _)| !sealed.contains_key(&recipient.device))
                .map(|(recipient, identity)| OlmTarget {
                    device: recipient.device,
                    identity: *identity,
                    prekey: prekeys.get(&recipient.device).copied(),
                })
                .collect();
            if !targets.is_empty() {
                let (results, sealed_with) =
                    store.seal_olm(&self.key, &targets, content_type, body, time, id)?;
                for (target, result) in targets.iter().zip(results) {
                    sealed.insert(target.device, result);
                }
                ticket = Some((store.clone(), sealed_with));
            }
        }
        Ok(Sealed {
            envelopes: recipients
                .iter()
                .map(|recipient| {
                    let result = sealed
                        .remove(&recipient.device)
                        .unwrap_or_else(|| Err("not sealed".into()));
                    (recipient.device, result)
                })
                .collect(),
            durable: Durable(ticket),
        })
    }

    /// The devices of `contact` to seal a message for, with their bound Olm keys; `domain`:
    /// the contact's key service's, for a contact on another server.
    pub(super) fn recipients_of(contact: &Contact, domain: Option<&str>) -> Vec<Recipient> {
        contact
            .recipient_keys()
            .into_iter()
            .map(|device| Recipient {
                device,
                olm: contact.olm_keys.get(&device).copied(),
                domain: domain.map(str::to_owned),
            })
            .collect()
    }

    /// The own other devices a sent copy goes to, with their bound Olm keys (from the own
    /// pin, when forward secrecy is on).
    pub(super) fn own_recipients(&self, devices: &[PublicKey]) -> Vec<Recipient> {
        let own = self
            .secrecy
            .get()
            .and_then(|store| store.own().ok().flatten());
        devices
            .iter()
            .map(|device| Recipient {
                device: *device,
                olm: own
                    .as_ref()
                    .and_then(|own| own.olm_keys.get(device).copied()),
                domain: None,
            })
            .collect()
    }

    /// After a fetch: asks each device whose messages did not decrypt to send them again,
    /// over a new session (so the next messages use it), and publishes more prekeys when
    /// pre-key messages used some. Failures are logged: the placeholders stay, and the user
    /// sees them.
    pub(super) async fn recover_sessions(
        &self,
        store: &Store,
        undecryptable: HashMap<PublicKey, BTreeSet<MessageId>>,
        used_prekeys: bool,
    ) {
        for (device, ids) in undecryptable {
            if let Err(err) = self.ask_resend(store, &device, ids).await {
                tracing::warn!(%device, "could not ask a device to send its messages again: {err}");
            }
        }
        if used_prekeys
            && self.secrecy.get().is_some()
            && let Err(err) = self.refill_prekeys(store).await
        {
            tracing::warn!("could not publish more prekeys: {err}");
        }
    }

    /// Sends `device` (of a contact or of the own identity, as verified) a `kez.resend`
    /// naming `ids`, over a new Olm session.
    async fn ask_resend(
        &self,
        store: &Store,
        device: &PublicKey,
        ids: BTreeSet<MessageId>,
    ) -> Result<(), ClientError> {
        let Some((contact, own)) = self.device_owner(store, device)? else {
            tracing::info!(%device, "a message that did not decrypt came from an unknown device; not asking it");
            return Ok(());
        };
        let domain = if own {
            None
        } else {
            self.domain_member(Endpoint::KeysClaim, Some(handle_domain(&contact.handle)))
                .await?
        };
        let recipient = Recipient {
            device: *device,
            olm: contact.olm_keys.get(device).copied(),
            domain,
        };
        let ids: Vec<MessageId> = ids.into_iter().collect();
        for chunk in ids.chunks(MAX_RESEND_IDS) {
            let body = Resend {
                ids: chunk.iter().copied().collect(),
            }
            .encode()
            .map_err(|err| ClientError::BadAnswer {
                subject: Endpoint::MailSend.subject().to_owned(),
                reason: err.to_string(),
            })?;
            let id = MessageId::random();
            self.deliver_one(&recipient, RESEND_CONTENT_TYPE, &body, now(), id, id, true)
                .await?;
            tracing::info!(%device, count = chunk.len(), "asked a device to send messages that did not decrypt again");
        }
        Ok(())
    }

    /// Answers a `kez.resend` from `message.from`, a verified device of a contact or of the
    /// own identity: the own sent messages it names are sealed again for that device, each
    /// with its id and time (a new frame id, so the inbox does not drop it as a duplicate).
    pub(super) async fn answer_resend(&self, store: &Store, message: &Message) {
        let Ok(request) = Resend::decode(&message.body) else {
            tracing::info!(from = %message.from, "a resend request that does not parse; ignored");
            return;
        };
        let device = message.from;
        let owner = match self.device_owner(store, &device) {
            Ok(Some(owner)) => owner,
            _ => return,
        };
        let (contact, own) = owner;
        let me = self.key.public_key();
        let peers: Vec<PublicKey> = if own {
            store
                .contacts()
                .map(|contacts| contacts.iter().map(|contact| contact.key).collect())
                .unwrap_or_default()
        } else {
            vec![contact.key]
        };
        let domain = if own {
            None
        } else {
            match self
                .domain_member(Endpoint::KeysClaim, Some(handle_domain(&contact.handle)))
                .await
            {
                Ok(domain) => domain,
                Err(err) => {
                    tracing::warn!("cannot answer a resend request: {err}");
                    return;
                }
            }
        };
        let recipient = Recipient {
            device,
            olm: contact.olm_keys.get(&device).copied(),
            domain,
        };
        for peer in peers {
            let messages = match store.take_resends(&me, &peer, &device, &request) {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!("cannot read the messages to send again: {err}");
                    return;
                }
            };
            for stored in messages {
                if let Err(err) = self.resend_one(&recipient, own, &stored).await {
                    tracing::warn!(id = %stored.id, "could not send a message again: {err}");
                } else {
                    tracing::info!(id = %stored.id, %device, "sent a message again on request");
                }
            }
        }
    }

    async fn resend_one(
        &self,
        recipient: &Recipient,
        own: bool,
        stored: &StoredMessage,
    ) -> Result<(), ClientError> {
        let (content_type, body) = if own {
            let copy = SentCopy {
                to: stored.to,
                content_type: stored.content_type.clone(),
                body: stored.body.clone(),
            }
            .encode();
            (SENT_COPY_CONTENT_TYPE, copy)
        } else {
            (stored.content_type.as_str(), stored.body.clone())
        };
        self.deliver_one(
            recipient,
            content_type,
            &body,
            stored.time,
            stored.id,
            MessageId::random(),
            false,
        )
        .await
    }

    /// Seals one message for one device and hands it to the server under `frame_id` (the
    /// inbox's de-duplication key), relayed when the recipient is on another domain.
    #[allow(clippy::too_many_arguments)]
    async fn deliver_one(
        &self,
        recipient: &Recipient,
        content_type: &str,
        body: &[u8],
        time: u64,
        id: MessageId,
        frame_id: MessageId,
        new_session: bool,
    ) -> Result<(), ClientError> {
        let relay = self
            .domain_member(Endpoint::MailRelay, recipient.domain.as_deref())
            .await?;
        let mut sealed = self
            .seal_for(
                std::slice::from_ref(recipient),
                content_type,
                body,
                time,
                id,
                new_session,
            )
            .await?;
        sealed.durable.wait().await?;
        let (_, envelope) = sealed.envelopes.pop().expect("one recipient, one result");
        let envelope = envelope.map_err(|reason| ClientError::Session {
            device: recipient.device,
            reason,
        })?;
        let (endpoint, request) =
            mail_request(relay.as_deref(), &recipient.device, &frame_id, &envelope);
        self.call_repeating(endpoint, request, None).await.map(drop)
    }

    /// The verified owner of `device`: a pinned contact it is an active device of, or the own
    /// identity (`true`).
    fn device_owner(
        &self,
        store: &Store,
        device: &PublicKey,
    ) -> Result<Option<(Contact, bool)>, StoreError> {
        if let Some(own) = store.own()?
            && own.signs_with(device)
        {
            return Ok(Some((own, true)));
        }
        Ok(store
            .contact_by_key(device)?
            .map(|contact| (contact, false)))
    }
}
