//! Mail for other domains (PROTOCOL.md §14.4): `kez.mail.relay` takes a client's envelope for
//! a user of another server into the JetStream stream `KEZ_OUTBOX`; the outbox worker (one per
//! instance, all sharing the durable consumer `relay`) hands each message to the peer's
//! `kez.mail.deliver`, retries what may pass later with a growing pause, and bounces the rest,
//! or what waited longer than `--bounce-after`, to the sending device as an envelope sealed
//! with the server key.
//!
//! ```text
//! KEZ_OUTBOX message: subject kez.outbox, body = the send frame (PROTOCOL.md §6.3), headers
//!   Nats-Msg-Id  <message id hex>.<recipient hex>
//!   Kez-Domain   the recipient's domain
//!   Kez-Sender   the sending device (hex)
//!   Kez-Identity the sending device's identity (hex)
//!   Kez-Queued   when the server took it, unix seconds
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use kez_core::PublicKey;
use kez_core::envelope::MessageId;
use kez_proto::ErrorAnswer;
use kez_proto::answer::Delivered;
use kez_proto::federation::{
    Attempt, BOUNCE_CONTENT_TYPE, Bounce, RelayRequest, after_failure, check_domain,
    domain_blocked, retry_delay,
};
use kez_proto::mail::SendRequest;
use kez_proto::{Endpoint, federation::not_federated};
use tokio::sync::{Semaphore, watch};

use crate::config::FederationConfig;
use crate::context::Context;
use crate::federation::{Federation, clean_name};
use crate::limits::Caller;

/// The outbox stream.
pub const OUTBOX_STREAM: &str = "KEZ_OUTBOX";
/// Its one subject.
pub const OUTBOX_SUBJECT: &str = "kez.outbox";
/// The durable pull consumer every instance's worker shares.
pub const OUTBOX_CONSUMER: &str = "relay";
/// Header: the recipient's domain.
pub const DOMAIN_HEADER: &str = "Kez-Domain";
/// Header: the sending device, hex.
pub const SENDER_HEADER: &str = "Kez-Sender";
/// Header: the sending device's identity, hex.
pub const IDENTITY_HEADER: &str = "Kez-Identity";
/// Header: when the server took the message, unix seconds.
pub const QUEUED_HEADER: &str = "Kez-Queued";
/// Bytes `KEZ_OUTBOX` may hold when the operator sets nothing (`--outbox-max-bytes`).
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 1 << 30;
/// How long a message is kept past `--bounce-after`: a worker that was down meanwhile still
/// bounces it.
const KEPT_PAST_BOUNCE: Duration = Duration::from_secs(24 * 3600);
/// The outbox's duplicate window: a relay repeated (a lost answer) is taken once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a worker may hold a message before the broker gives it to another.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Messages handed out and not yet acknowledged, over every instance.
const MAX_ACK_PENDING: i64 = 512;
/// Messages one worker handles at once.
const IN_FLIGHT: usize = 64;
/// How long a peer may take to answer a delivery.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before a worker that lost its consumer asks for it again.
const WORKER_RETRY: Duration = Duration::from_secs(1);
/// How often the pending gauge is read when no message comes.
const PENDING_EVERY: Duration = Duration::from_secs(10);
/// How long a stopping worker waits for its deliveries in flight.
const STOP_GRACE: Duration = Duration::from_secs(12);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Creates (or updates) `KEZ_OUTBOX` and its consumer.
pub async fn open(
    js: &jetstream::Context,
    replicas: Option<usize>,
    config: &FederationConfig,
) -> Result<(), async_nats::Error> {
    let max_bytes = config.outbox_max_bytes.unwrap_or(DEFAULT_OUTBOX_MAX_BYTES);
    // Without the setting an existing outbox keeps its replicas, and a new one gets the inbox
    // stream's (which the store just opened): a start never scales a cluster's stream down.
    let replicas = match replicas {
        Some(replicas) => replicas,
        None => {
            let name = match js.get_stream(OUTBOX_STREAM).await {
                Ok(_) => OUTBOX_STREAM,
                Err(_) => kez_proto::subjects::MAIL_STREAM,
            };
            js.get_stream(name)
                .await?
                .cached_info()
                .config
                .num_replicas
                .max(1)
        }
    };
    crate::store::ensure_stream(
        js,
        jetstream::stream::Config {
            name: OUTBOX_STREAM.to_owned(),
            description: Some("kez-chat: envelopes waiting for other servers".to_owned()),
            subjects: vec![OUTBOX_SUBJECT.to_owned()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            discard: jetstream::stream::DiscardPolicy::New,
            max_message_size: crate::store::INBOX_MAX_STORED_BYTES,
            max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            max_age: config.bounce_after + KEPT_PAST_BOUNCE,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await?;
    consumer(js).await?;
    Ok(())
}

async fn consumer(
    js: &jetstream::Context,
) -> Result<jetstream::consumer::Consumer<pull::Config>, async_nats::Error> {
    let stream = js.get_stream_no_info(OUTBOX_STREAM).await?;
    Ok(stream
        .get_or_create_consumer(
            OUTBOX_CONSUMER,
            pull::Config {
                durable_name: Some(OUTBOX_CONSUMER.to_owned()),
                description: Some("kez-chat: hands the outbox to peer servers".to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await?)
}

/// Answers `kez.mail.relay` from `caller`: the same budget as `kez.mail.send`, the domain
/// checked, then the message stored in the outbox.
pub async fn relay(
    ctx: &Context,
    caller: &Caller,
    request: &RelayRequest<'_>,
    now: u64,
) -> Result<Bytes, ErrorAnswer> {
    if request.domain == ctx.domain {
        return Err(ErrorAnswer::malformed(format!(
            "{} is this server's own domain: use kez.mail.send",
            request.domain
        )));
    }
    let Some(federation) = &ctx.federation else {
        return Err(not_federated(&request.domain, &ctx.domain));
    };
    // A bounce goes back to the sending device: the sender must be known.
    let device = caller
        .user
        .as_deref()
        .and_then(|user| PublicKey::from_nkey(user).ok())
        .ok_or_else(|| {
            ErrorAnswer::new(
                403,
                "forbidden",
                "kez.mail.relay needs a connection through the server's auth callout with a registered key or device",
            )
        })?;
    crate::mail::charge(
        &ctx.store,
        &ctx.limiters,
        &ctx.mail,
        caller,
        request.send.envelope.len(),
    )
    .await?;
    let identity = ctx.mail.identities.of(&ctx.store, device).await?;
    federation.check_allowed(&request.domain).await?;
    enqueue(ctx, &request.domain, device, identity, &request.send, now).await
}

/// Stores `send` from `device` (of `identity`) in the outbox toward `domain` and answers as
/// `kez.mail.send` does (`seq` is the outbox's): the caller checked the domain and the budget.
pub(crate) async fn enqueue(
    ctx: &Context,
    domain: &str,
    device: PublicKey,
    identity: PublicKey,
    send: &SendRequest<'_>,
    now: u64,
) -> Result<Bytes, ErrorAnswer> {
    let mut headers = async_nats::HeaderMap::new();
    let msg_id = format!("{}.{}", send.id, send.to.to_hex());
    headers.insert("Nats-Msg-Id", msg_id.as_str());
    headers.insert(DOMAIN_HEADER, domain);
    headers.insert(SENDER_HEADER, device.to_hex().as_str());
    headers.insert(IDENTITY_HEADER, identity.to_hex().as_str());
    headers.insert(QUEUED_HEADER, now.to_string().as_str());
    let frame = SendRequest::encode(&send.to, &send.id, send.envelope);
    let ack = ctx
        .store
        .jetstream()
        .publish_with_headers(OUTBOX_SUBJECT, headers, Bytes::from(frame))
        .await
        .map_err(ErrorAnswer::unavailable)?
        .await
        .map_err(|err| {
            ErrorAnswer::new(
                503,
                "store_full",
                format!("the outbox did not take the message ({err}): nothing was stored; try again later"),
            )
            .with_retry_after_ms(5_000)
        })?;
    kez_proto::answer::encode(&Delivered {
        seq: ack.sequence,
        duplicate: ack.duplicate,
    })
    .map(Bytes::from)
}

/// Where mail for `to`, a key of the local `identity`, goes instead of its inbox here
/// (PROTOCOL.md §14.6): the domain of the home `identity`'s verified chain names, when `to` is
/// the identity's own key (the key that moved; its other devices still read this server), that
/// home is on another domain, federation is on and that domain not blocked. `None`: store it
/// here as always.
pub(crate) async fn forward_domain(
    ctx: &Context,
    identity: PublicKey,
    to: PublicKey,
) -> Result<Option<String>, ErrorAnswer> {
    let Some(federation) = &ctx.federation else {
        return Ok(None);
    };
    if to != identity {
        return Ok(None);
    }
    let Some(home) = ctx.store.home_of(identity).await? else {
        return Ok(None);
    };
    if home.domain() == ctx.domain || federation.check_allowed(home.domain()).await.is_err() {
        return Ok(None);
    }
    Ok(Some(home.domain().to_owned()))
}

/// An outbox message's headers, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The recipient's domain.
    pub domain: String,
    /// The sending device.
    pub sender: PublicKey,
    /// Its identity.
    pub identity: PublicKey,
    /// When the server took it, unix seconds.
    pub queued_at: u64,
}

impl Queued {
    /// Reads the headers `header` gives (`None` for a missing one).
    pub fn read<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Result<Queued, String> {
        let get = |name: &str| header(name).ok_or_else(|| format!("no {name} header"));
        let key = |name: &str| {
            get(name).and_then(|hex| {
                format!("ed25519:{hex}")
                    .parse::<PublicKey>()
                    .map_err(|err| format!("{name}: {err}"))
            })
        };
        Ok(Queued {
            domain: check_domain(DOMAIN_HEADER, get(DOMAIN_HEADER)?).map_err(|err| err.message)?,
            sender: key(SENDER_HEADER)?,
            identity: key(IDENTITY_HEADER)?,
            queued_at: get(QUEUED_HEADER)?
                .parse()
                .map_err(|_| format!("{QUEUED_HEADER} is not a number"))?,
        })
    }
}

/// `wait` for people: in days, hours, minutes or seconds, whichever reads best.
fn span(wait: Duration) -> String {
    let secs = wait.as_secs();
    let (count, unit) = match secs {
        s if s >= 2 * 86_400 => (s.div_ceil(86_400), "days"),
        s if s >= 2 * 3_600 => (s.div_ceil(3_600), "hours"),
        s if s >= 120 => (s.div_ceil(60), "minutes"),
        s => (s, "seconds"),
    };
    format!("{count} {unit}")
}
/// The bounce of message `id` to `to` on `queued.domain`, which failed for `reason` (an error
/// name, or `expired`). The message is the server's own words: a peer's text never goes in.
pub fn bounce_of(
    id: &MessageId,
    to: PublicKey,
    queued: &Queued,
    reason: &str,
    bounce_after: Duration,
) -> Bounce {
    let reason = clean_name(reason).unwrap_or("refused").to_owned();
    let domain = &queued.domain;
    let message = match reason.as_str() {
        "expired" => format!(
            "{domain}'s server could not be reached or did not take the message within {}; it was not delivered",
            span(bounce_after)
        ),
        "domain_blocked" => format!(
            "this server does not exchange mail with {domain}; the message was not delivered"
        ),
        _ => format!("{domain}'s server refused the message; it was not delivered"),
    };
    Bounce {
        id: id.to_string(),
        to,
        domain: domain.clone(),
        reason,
        message,
        queued_at: queued.queued_at,
    }
}

/// Runs the outbox worker until `stop` changes.
pub async fn run(context: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let Some(federation) = context.federation.clone() else {
        return;
    };
    let js = context.store.jetstream().clone();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    'consumer: loop {
        let consumer = match consumer(&js).await {
            Ok(consumer) => consumer,
            Err(err) => {
                tracing::warn!(error = %err, "outbox: no consumer; retrying");
                tokio::select! {
                    () = tokio::time::sleep(WORKER_RETRY) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(IN_FLIGHT)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(error = %err, "outbox: cannot read the consumer; retrying");
                tokio::select! {
                    () = tokio::time::sleep(WORKER_RETRY) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        let mut pending_tick = tokio::time::interval(PENDING_EVERY);
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                _ = stop.changed() => break 'consumer,
            };
            let message = tokio::select! {
                message = messages.next() => message,
                _ = pending_tick.tick() => {
                    if let Ok(info) = consumer.get_info().await {
                        context.metrics.set_outbox_pending(info.num_pending);
                    }
                    continue;
                }
                _ = stop.changed() => break 'consumer,
            };
            match message {
                Some(Ok(message)) => {
                    let context = context.clone();
                    let federation = federation.clone();
                    tokio::spawn(async move {
                        handle(&context, &federation, message).await;
                        drop(permit);
                    });
                }
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "outbox: a pull failed");
                }
                None => {
                    tokio::time::sleep(WORKER_RETRY).await;
                    continue 'consumer;
                }
            }
        }
    }
    // Deliveries in flight finish (their peers answer within DELIVER_TIMEOUT), or are handed
    // to another worker after the ack wait.
    let _ = tokio::time::timeout(STOP_GRACE, permits.acquire_many(IN_FLIGHT as u32)).await;
}

/// One outbox message: delivered and acknowledged, put back for later, or bounced.
async fn handle(context: &Context, federation: &Federation, message: jetstream::Message) {
    let now = unix_now();
    let headers = message.headers.as_ref();
    let queued = Queued::read(|name| {
        headers
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str())
    });
    let (queued, request) = match (queued, SendRequest::decode(&message.payload)) {
        (Ok(queued), Ok(request)) => (queued, request),
        (Err(err), _) => return drop_unreadable(message, err).await,
        (_, Err(err)) => return drop_unreadable(message, err.to_string()).await,
    };
    let (attempt, pending) = match message.info() {
        Ok(info) => (
            u64::try_from(info.delivered).unwrap_or(1).max(1),
            info.pending,
        ),
        Err(_) => (1, 0),
    };
    context.metrics.set_outbox_pending(pending);
    let domain = queued.domain.as_str();
    let result = match federation.check_allowed(domain).await {
        Err(err) if err.name == "domain_blocked" => Err(domain_blocked(domain)),
        Err(err) => Err(err),
        Ok(()) => federation
            .request(
                domain,
                Endpoint::MailDeliver,
                message.payload.clone(),
                DELIVER_TIMEOUT,
                now,
            )
            .await
            .and_then(|answer| {
                serde_json::from_slice::<Delivered>(&answer).map_err(|err| {
                    crate::federation::bad_peer_answer(domain, format!("not a delivery: {err}"))
                })
            }),
    };
    let err = match result {
        Ok(_) => {
            context.metrics.record_federation_sent(domain);
            ack(&message, AckKind::Ack).await;
            return;
        }
        Err(err) => err,
    };
    let config = federation.config();
    let age = Duration::from_secs(now.saturating_sub(queued.queued_at));
    let attempt_kind = after_failure(&err);
    if attempt_kind == Attempt::Retry && age < config.bounce_after {
        let delay = retry_delay(attempt, config.retry_max, err.retry_after_ms);
        tracing::debug!(%domain, attempt, ?delay, error = %err, "outbox: delivery failed; retrying later");
        context.metrics.record_federation_retry(domain);
        ack(&message, AckKind::Nak(Some(delay))).await;
        return;
    }
    let reason = match attempt_kind {
        Attempt::Retry => "expired",
        Attempt::Bounce => err.name.as_ref(),
    };
    let bounce = bounce_of(
        &request.id,
        request.to,
        &queued,
        reason,
        config.bounce_after,
    );
    match store_bounce(context, federation, &queued, &bounce, now).await {
        Ok(()) => {
            tracing::info!(%domain, reason = %bounce.reason, "outbox: message bounced to its sender");
            context
                .metrics
                .record_federation_bounced(domain, &bounce.reason);
            ack(&message, AckKind::Ack).await;
        }
        Err(store_err) => {
            tracing::warn!(%domain, error = %store_err, "outbox: the bounce could not be stored; trying again later");
            ack(&message, AckKind::Nak(Some(config.retry_max))).await;
        }
    }
}

/// Seals `bounce` with the server key to the sending device and stores it in its inbox.
async fn store_bounce(
    context: &Context,
    federation: &Federation,
    queued: &Queued,
    bounce: &Bounce,
    now: u64,
) -> Result<(), ErrorAnswer> {
    let body = serde_json::to_vec(bounce).expect("a bounce serialises");
    let (_, envelope) = kez_core::envelope::seal(
        federation.secret_key(),
        &queued.sender,
        BOUNCE_CONTENT_TYPE,
        &body,
        now,
    )
    .map_err(|err| ErrorAnswer::internal(format!("sealing a bounce: {err}")))?;
    let msg_id = format!("bounce.{}.{}", bounce.id, bounce.to.to_hex());
    context
        .store
        .store_in_inbox(
            queued.identity,
            queued.sender,
            &msg_id,
            None,
            Bytes::from(envelope),
        )
        .await
        .map(drop)
}

async fn drop_unreadable(message: jetstream::Message, why: String) {
    tracing::warn!(error = %why, "outbox: an unreadable message is dropped");
    ack(&message, AckKind::Term).await;
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(err) = message.ack_with(kind).await {
        tracing::debug!(error = %err, "outbox: acknowledgement lost; the message comes again");
    }
}

#[cfg(test)]
mod tests {
    use kez_core::SecretKey;

    use super::*;

    fn queued() -> Queued {
        Queued {
            domain: "b.localhost".into(),
            sender: SecretKey::from_seed(&[1; 32]).public_key(),
            identity: SecretKey::from_seed(&[2; 32]).public_key(),
            queued_at: 1_000,
        }
    }

    #[test]
    fn the_headers_read_back_and_bad_ones_are_named() {
        let queued = queued();
        let (sender, identity) = (queued.sender.to_hex(), queued.identity.to_hex());
        let headers = |domain: &'static str, queued_at: &'static str| {
            let (sender, identity) = (sender.clone(), identity.clone());
            move |name: &str| -> Option<String> {
                match name {
                    DOMAIN_HEADER => Some(domain.to_owned()),
                    SENDER_HEADER => Some(sender.clone()),
                    IDENTITY_HEADER => Some(identity.clone()),
                    QUEUED_HEADER => Some(queued_at.to_owned()),
                    _ => None,
                }
            }
        };
        let read = |get: &dyn Fn(&str) -> Option<String>| {
            let values: Vec<(String, Option<String>)> =
                [DOMAIN_HEADER, SENDER_HEADER, IDENTITY_HEADER, QUEUED_HEADER]
                    .into_iter()
                    .map(|name| (name.to_owned(), get(name)))
                    .collect();
            Queued::read(|name| {
                values
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, value)| value.as_deref())
            })
        };
        assert_eq!(read(&headers("b.localhost", "1000")), Ok(queued));
        assert!(read(&headers("b_x", "1000")).is_err());
        assert!(read(&headers("b.localhost", "soon")).is_err());
        assert!(Queued::read(|_| None).unwrap_err().contains(DOMAIN_HEADER));
    }

    #[test]
    fn a_bounce_says_why_in_the_servers_own_words() {
        let id = MessageId::from_bytes([7; 16]);
        let to = SecretKey::from_seed(&[3; 32]).public_key();
        let day = Duration::from_secs(24 * 3600);
        let bounce = bounce_of(&id, to, &queued(), "unknown_recipient", day);
        assert_eq!(bounce.id, "07".repeat(16));
        assert_eq!(bounce.message_id(), Some(id));
        assert_eq!(
            (
                bounce.reason.as_str(),
                bounce.queued_at,
                bounce.domain.as_str()
            ),
            ("unknown_recipient", 1_000, "b.localhost")
        );
        assert!(bounce.message.contains("refused"), "{}", bounce.message);
        let expired = bounce_of(&id, to, &queued(), "expired", day);
        assert!(expired.message.contains("24 hours"), "{}", expired.message);
        assert_eq!(span(Duration::from_secs(8)), "8 seconds");
        assert_eq!(span(Duration::from_secs(600)), "10 minutes");
        assert_eq!(span(Duration::from_secs(3 * 86_400)), "3 days");
        let hostile = bounce_of(&id, to, &queued(), "Evil\nName", day);
        assert_eq!(hostile.reason, "refused");
        assert!(!hostile.message.contains("Evil"));
        let json = serde_json::to_string(&bounce).unwrap();
        assert_eq!(serde_json::from_str::<Bounce>(&json).unwrap(), bounce);
    }
}
