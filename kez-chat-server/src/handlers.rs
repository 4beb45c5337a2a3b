//! The wire layer: decode a request, call the store, encode the answer. PROTOCOL.md §5.

use bytes::Bytes;
use kez_core::connect::ProofForm;
use kez_core::sigchain::MAX_LINK_BYTES;
use kez_proto::answer::{
    ChainPage, FederationInfo, HandleRecord, HeadAnswer, Limits, PinInfo, Profile, ServerInfo,
};
use kez_proto::federation::not_federated;
use kez_proto::registry::REGISTRATION_WINDOW_SECS;
use kez_proto::request::{MAX_CHAIN_PAGE_BYTES, MAX_REQUEST_BYTES, Request};
use kez_proto::{Endpoint, ErrorAnswer};
use serde::Serialize;

use crate::callout::Verdict;
use crate::context::Context;
use crate::limits::{Caller, Limited};
use crate::metrics::CalloutDecision;
use crate::store::{DeviceState, Registered};

/// 429 `rate_limited`, with the time to wait.
fn rate_limited(limited: Limited) -> ErrorAnswer {
    let ms = limited.retry_after_ms();
    ErrorAnswer::new(
        429,
        "rate_limited",
        format!("too many requests from this key; retry in {ms} ms"),
    )
    .with_retry_after_ms(ms)
}

/// 429 `too_many_registrations`, with the time to wait.
fn too_many_registrations(limited: Limited) -> ErrorAnswer {
    let ms = limited.retry_after_ms();
    ErrorAnswer::new(
        429,
        "too_many_registrations",
        format!(
            "too many registrations from this address; retry in {} s",
            ms.div_ceil(1000)
        ),
    )
    .with_retry_after_ms(ms)
}

/// Applies the limits that need no decoding: the caller's key (as nats-server names it) and,
/// for registrations, the caller's address. Cheap, so it runs before anything else.
fn check_caller(ctx: &Context, route: Endpoint, caller: &Caller) -> Result<(), ErrorAnswer> {
    let now = std::time::Instant::now();
    if route.is_rate_limited()
        && let Some(user) = &caller.user
    {
        ctx.limiters
            .per_key
            .check(user, now)
            .map_err(rate_limited)?;
    }
    if route == Endpoint::Register {
        if let Some(host) = &caller.host {
            ctx.limiters
                .register_per_addr
                .check(host, now)
                .map_err(too_many_registrations)?;
        }
        ctx.limiters
            .register_global
            .check("", now)
            .map_err(too_many_registrations)?;
    }
    Ok(())
}

/// Without a caller nats-server vouches for (a trusted broker without the callout, or a broker
/// config without `share: true`), registrations and appends count against the key they are
/// signed by (the registering key; the chain's key) instead.
fn check_signed_key(ctx: &Context, caller: &Caller, request: &Request) -> Result<(), ErrorAnswer> {
    if caller.user.is_some() {
        return Ok(());
    }
    let key = match request {
        Request::Register { request, .. } => request.key,
        Request::Append(link) => link.link().chain,
        _ => return Ok(()),
    };
    ctx.limiters
        .per_key
        .check(&key.to_nkey(), std::time::Instant::now())
        .map_err(rate_limited)
}

/// Answers one request from `caller` (see [`Caller`]; unknown without the callout).
pub async fn handle(
    ctx: &Context,
    route: Endpoint,
    body: &[u8],
    caller: &Caller,
    now: u64,
) -> Result<Bytes, ErrorAnswer> {
    check_caller(ctx, route, caller)?;
    let request = kez_proto::decode(route, body, &ctx.domain, now)?;
    check_signed_key(ctx, caller, &request)?;
    match request {
        Request::Register { request, handle } => {
            let record = match ctx.store.register(&handle, request.key, now).await? {
                Registered::New(record) => {
                    tracing::info!(handle = %record.handle, key = %record.key, "registered");
                    record
                }
                Registered::Existing(record) => record,
            };
            answer(&record)
        }
        Request::Lookup(handle) if handle.domain() != ctx.domain => {
            let federation = remote_reader(ctx, caller, handle.domain()).await?;
            answer(&federation.lookup(&handle, now).await?)
        }
        Request::Whois(key, Some(domain)) => {
            let federation = remote_reader(ctx, caller, &domain).await?;
            answer(&federation.whois(key, &domain, now).await?)
        }
        Request::Head(key, Some(domain)) => {
            let federation = remote_reader(ctx, caller, &domain).await?;
            answer(&federation.head(key, &domain, now).await?)
        }
        Request::GetChain {
            key,
            from_seq,
            domain: Some(domain),
        } => {
            let federation = remote_reader(ctx, caller, &domain).await?;
            answer(&federation.chain(key, from_seq, &domain, now).await?)
        }
        Request::Lookup(handle) => {
            let record = ctx
                .store
                .handle(handle.name())
                .await?
                .ok_or_else(|| ErrorAnswer::not_found(format!("{handle} is not registered")))?;
            profile(ctx, record).await
        }
        Request::Whois(key, None) => {
            let record = match ctx.store.whois(key).await? {
                Some(record) => Some(record),
                // An active device answers for its identity: the asker checks that the
                // identity's chain lists the device.
                None => match ctx.store.device(key).await? {
                    Some(device) if device.state == DeviceState::Active => {
                        ctx.store.whois(device.identity).await?
                    }
                    _ => None,
                },
            };
            let record = record.ok_or_else(|| {
                ErrorAnswer::not_found(format!(
                    "{key} has no handle and is no active device on this server"
                ))
            })?;
            profile(ctx, record).await
        }
        Request::Append(_) => {
            // The store parses the link again (at most MAX_LINK_BYTES) and checks the chain.
            let head = ctx.store.append(body).await?;
            answer(&head)
        }
        Request::GetChain {
            key,
            from_seq,
            domain: None,
        } => {
            let (links, more) = ctx
                .store
                .links_page(key, from_seq, MAX_CHAIN_PAGE_BYTES)
                .await?;
            if links.is_empty() && (from_seq == 1 || !ctx.store.has_chain(key).await?) {
                return Err(ErrorAnswer::not_found(format!(
                    "{key} has no sigchain on this server"
                )));
            }
            let links = links
                .into_iter()
                .map(|link| {
                    String::from_utf8(link.to_vec())
                        .map_err(|_| ErrorAnswer::internal("stored link is not UTF-8"))
                })
                .collect::<Result<_, _>>()?;
            answer(&ChainPage {
                key,
                from_seq,
                links,
                more,
            })
        }
        Request::Head(key, None) => {
            let head = ctx.store.head(key).await?.ok_or_else(|| {
                ErrorAnswer::not_found(format!("{key} has no sigchain on this server"))
            })?;
            answer(&HeadAnswer {
                key,
                seq: head.seq,
                head: head.head,
            })
        }
        Request::Authorize => authorize(ctx, body, now).await,
        Request::Info => answer(&ServerInfo {
            domain: ctx.domain.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            limits: Limits {
                max_request_bytes: MAX_REQUEST_BYTES as u64,
                max_link_bytes: MAX_LINK_BYTES as u64,
                max_chain_page_bytes: MAX_CHAIN_PAGE_BYTES as u64,
                registration_window_secs: REGISTRATION_WINDOW_SECS,
            },
            pin: ctx.pin.as_ref().map(|pin| PinInfo {
                provider: pin.provider(),
                quota_bytes: pin.quota_bytes(),
            }),
            federation: ctx.federation.as_ref().map(|federation| FederationInfo {
                key: federation.public_key(),
            }),
            directory: true,
        }),
        Request::Pin(request) => {
            let Some(pinning) = &ctx.pin else {
                return Err(ErrorAnswer::new(
                    503,
                    "unavailable",
                    "pinning is not enabled on this server",
                ));
            };
            crate::pin::handle(&ctx.store, pinning, &request, now).await
        }
        Request::MailSend(request) => crate::mail::send(ctx, caller, &request, now).await,
        Request::MailRelay(request) => crate::outbox::relay(ctx, caller, &request, now).await,
        Request::MailDeliver(request) => match &ctx.federation {
            Some(federation) => {
                federation
                    .deliver(&ctx.store, &ctx.mail, &ctx.metrics, caller, &request)
                    .await
            }
            None => Err(ErrorAnswer::new(
                403,
                "forbidden",
                "only a peer server may deliver mail here, and this server does not federate",
            )),
        },
        Request::PairPut(request) => ctx.relay.put(&ctx.store, caller, &request, now).await,
        Request::PairGet(request) => ctx.relay.get(caller, &request, now).await,
        Request::KeysPublish(request) => {
            ctx.keys
                .publish(
                    &ctx.store,
                    &ctx.mail.recipients,
                    &ctx.metrics,
                    caller,
                    request,
                )
                .await
        }
        Request::KeysCount => {
            ctx.keys
                .count(&ctx.store, &ctx.mail.recipients, caller)
                .await
        }
        Request::KeysClaim(device, domain) => {
            // The claimer's budget (a peer server's claims count against its key); like the
            // per-key limit, only for a caller nats-server names.
            if let Some(claimer) = &caller.user {
                ctx.limiters
                    .claim_per_key
                    .check(claimer, std::time::Instant::now())
                    .map_err(|limited| {
                        let ms = limited.retry_after_ms();
                        ErrorAnswer::rate_limited(
                            format!("too many prekey claims from this key; retry in {ms} ms"),
                            ms,
                        )
                    })?;
            }
            let claimed = match domain {
                Some(domain) => {
                    let federation = remote_reader(ctx, caller, &domain).await?;
                    federation.claim(device, &domain, now).await?
                }
                None => {
                    ctx.keys
                        .claim(
                            &ctx.store,
                            &ctx.mail.recipients,
                            &ctx.limiters,
                            &ctx.metrics,
                            device,
                        )
                        .await?
                }
            };
            answer(&claimed)
        }
        Request::MailFetch(request) => {
            crate::mail::fetch(
                &ctx.store,
                &ctx.domain,
                &ctx.mail.identities,
                &ctx.mail.floors,
                &ctx.metrics,
                caller,
                &request,
            )
            .await
        }
    }
}

/// Always answers (a refusal is a signed response too), so nats-server never waits out its
/// timeout on us.
async fn authorize(ctx: &Context, body: &[u8], now: u64) -> Result<Bytes, ErrorAnswer> {
    let Some(callout) = &ctx.callout else {
        return Err(ErrorAnswer::new(
            503,
            "unavailable",
            "the auth callout is not enabled",
        ));
    };
    let (response, verdict) = callout.authorize(body, now).await;
    let decision = match &verdict {
        Verdict::Denied(reason) => {
            tracing::warn!(%reason, "connection refused");
            CalloutDecision::Denied
        }
        Verdict::Registered(key, _) => {
            tracing::debug!(%key, "connection authorized (registered)");
            CalloutDecision::Registered
        }
        Verdict::Device(key, identity, _) => {
            tracing::debug!(%key, %identity, "connection authorized (device)");
            CalloutDecision::Registered
        }
        Verdict::Unregistered(key, _) => {
            tracing::debug!(%key, "connection authorized (unregistered)");
            CalloutDecision::Unregistered
        }
        Verdict::Peer(key, domain) => {
            tracing::info!(%key, %domain, "connection authorized (peer server)");
            CalloutDecision::Peer
        }
        Verdict::PeerRefused {
            domain,
            reason,
            message,
        } => {
            tracing::warn!(%domain, %reason, %message, "peer connection refused");
            ctx.metrics.record_federation_refused(domain, reason);
            CalloutDecision::Denied
        }
    };
    if let Verdict::Registered(key, ProofForm::Legacy)
    | Verdict::Device(key, _, ProofForm::Legacy)
    | Verdict::Unregistered(key, ProofForm::Legacy) = &verdict
    {
        tracing::info!(%key, "connection proved its key the old way (an untagged nonce signature): that client signs whatever a broker sends; upgrade it");
        ctx.metrics.record_legacy_proof();
    }
    ctx.metrics.record_callout(decision);
    Ok(Bytes::from(response))
}

/// Federation, to proxy a read for `domain` asked by `caller`: `not_federated` when it is off;
/// 403 `forbidden` unless the caller is a user of this server (a registered key or an active
/// device): a key without a handle, or a peer server, must not make this server reach out to
/// any domain it names.
async fn remote_reader<'a>(
    ctx: &'a Context,
    caller: &Caller,
    domain: &str,
) -> Result<&'a crate::federation::Federation, ErrorAnswer> {
    let federation = ctx
        .federation
        .as_deref()
        .ok_or_else(|| not_federated(domain, &ctx.domain))?;
    let key = caller
        .user
        .as_deref()
        .and_then(|user| kez_core::PublicKey::from_nkey(user).ok());
    let local = match key {
        None => false,
        Some(key) => {
            ctx.mail.recipients.is_registered(&ctx.store, key).await?
                || ctx
                    .store
                    .device(key)
                    .await?
                    .is_some_and(|device| device.state == DeviceState::Active)
        }
    };
    match local {
        true => Ok(federation),
        false => Err(ErrorAnswer::new(
            403,
            "forbidden",
            format!(
                "reads of {domain} through this server are for its registered users; ask {domain}'s server itself"
            ),
        )),
    }
}

async fn profile(ctx: &Context, record: HandleRecord) -> Result<Bytes, ErrorAnswer> {
    let sigchain = ctx.store.head(record.key).await?;
    answer(&Profile::new(record, sigchain))
}

fn answer<T: Serialize>(value: &T) -> Result<Bytes, ErrorAnswer> {
    kez_proto::answer::encode(value).map(Bytes::from)
}
