//! `device join` (the new device) and `device add` (an existing device): pairing through the
//! home server's relay, which neither side trusts (PROTOCOL.md §4.7, §5.6). The new key comes
//! from the request line the user carries to the existing device, never from the server.

use std::sync::Arc;
use std::time::Duration;

use data_encoding::BASE64;
use kez_client::{Connection, now};
use kez_client::{PairGetRequest as GetRequest, PairPutRequest as PutRequest, PairSlot as Slot};
use kez_core::pair::{
    self, MAX_LIFETIME_SECS, PairError, PairRequest, SYNC_CONTENT_TYPE, Sync, SyncContact,
};
use kez_core::sigchain::DeviceKind;
use kez_core::trust::VerifiedChain;
use kez_core::{Handle, envelope};

use crate::failure::{self, Failure, RUNTIME, USAGE};
use crate::term::{self, say, tell, tell_part};
use crate::{App, display};

/// How often a waiting device asks the relay.
const POLL: Duration = Duration::from_secs(1);
/// How often the countdown is shown when stderr is not a terminal.
const PROGRESS_EVERY: u64 = 30;

/// What ended a wait.
enum Waited {
    Got(String),
    Expired,
    Cancelled,
}

/// Asks the relay for `slot` of `request` every [`POLL`] until it holds something, the
/// request expires or Ctrl-C; shows the time left (`what` says what is awaited).
async fn wait_for(
    conn: &Connection,
    request: &PairRequest,
    slot: Slot,
    what: &str,
) -> Result<Waited, Failure> {
    let get = GetRequest {
        device: request.device,
        nonce: request.nonce.to_hex(),
        slot,
    };
    let terminal = term::is_terminal();
    let stop = term::interrupted();
    tokio::pin!(stop);
    let mut last_shown = None;
    loop {
        let now = now();
        if now >= request.expires {
            if terminal {
                tell!();
            }
            return Ok(Waited::Expired);
        }
        let left = request.expires - now;
        if terminal {
            tell_part!(
                "\rwaiting for {what}: {}:{:02} left (Ctrl-C to stop)  ",
                left / 60,
                left % 60
            );
        } else if last_shown.is_none_or(|shown: u64| shown >= left + PROGRESS_EVERY) {
            tell!("waiting for {what}: {} s left", left);
            last_shown = Some(left);
        }
        match conn.pair_get(&get).await {
            Ok(Some(data)) => {
                if terminal {
                    tell!();
                }
                return Ok(Waited::Got(data));
            }
            Ok(None) => {}
            Err(err) => {
                // An expired slot or a refusal is final; a network hiccup is not.
                if let kez_client::ClientError::Service(service) = &err
                    && matches!(service.answer.code, 403 | 410)
                {
                    return Err(Failure::client(err));
                }
            }
        }
        tokio::select! {
            _ = &mut stop => {
                if terminal {
                    tell!();
                }
                return Ok(Waited::Cancelled);
            }
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

fn put(request: &PairRequest, slot: Slot, data: String) -> PutRequest {
    PutRequest {
        device: request.device,
        nonce: request.nonce.to_hex(),
        slot,
        expires: request.expires,
        data,
    }
}

fn pair_failure(err: &PairError) -> Failure {
    let code = match err {
        PairError::WrongIdentity { .. } | PairError::AlreadyUsed | PairError::NameTaken(_) => {
            failure::CONFLICT
        }
        PairError::BadRequest(_)
        | PairError::BadChecksum
        | PairError::UnknownVersion(_)
        | PairError::Expired(_)
        | PairError::TooFarAhead(_) => USAGE,
        _ => failure::REFUSED,
    };
    Failure::new(code, format!("{err} [{}]", err.code()))
}

impl App {
    /// `device join @name [--name N] [--kind K]`: a fresh home asks to become a device of
    /// `@name`'s identity, shows the request, and waits for an existing device.
    pub(crate) async fn join(
        mut self,
        handle: &str,
        name: Option<String>,
        kind: DeviceKind,
        wait: u64,
    ) -> Result<(), Failure> {
        if let Some(existing) = &self.config.handle {
            return Err(Failure::new(
                USAGE,
                format!(
                    "this home is already {existing}: pair a new home instead (--home DIR on the new device)"
                ),
            ));
        }
        let url = self.server()?;
        let (key, made) = self.home.key_or_create().map_err(Failure::home)?;
        if made {
            tell!(
                "made this device's key in {}",
                self.home.key_path().display()
            );
        }
        let key = Arc::new(key);
        let device = key.public_key();
        let conn = self.connect_to(&url, key.clone()).await?;
        let domain = conn.server_info().await.map_err(Failure::client)?.domain;
        let full = Handle::parse(handle, &domain).map_err(|err| {
            Failure::new(USAGE, format!("{handle:?} is not a valid handle: {err}"))
        })?;
        let profile = conn.lookup(&full).await.map_err(Failure::client)?;
        let identity = profile.key;
        let name = name.unwrap_or_else(|| format!("{}-{}", kind, &device.to_hex()[..4]));
        let request = PairRequest::new(
            identity,
            &full.to_string(),
            device,
            &name,
            kind,
            now(),
            wait.min(MAX_LIFETIME_SECS),
        )
        .map_err(|err| pair_failure(&err))?;
        let line = request.to_line();
        tell!(
            "To make this home device {} ({kind}) of {full}, run on one of your devices of {full}:",
            display::inline(&name)
        );
        tell!();
        say!("{line}");
        tell!();
        tell!("  kez-chat device add '{line}'");
        tell!();
        if let Ok(code) = qrcode::QrCode::new(line.as_bytes()) {
            let image = code
                .render::<qrcode::render::unicode::Dense1x2>()
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .build();
            tell!("{image}");
        }
        tell!(
            "Fingerprint: {}  (the other device shows it too: they must match)",
            request.fingerprint()
        );
        tell!("This device's key: {device}");
        let offer = match wait_for(&conn, &request, Slot::Offer, "your other device").await? {
            Waited::Got(offer) => offer,
            Waited::Expired => {
                return Err(Failure::new(
                    RUNTIME,
                    "the pairing request expired before another device answered; nothing changed. Run `kez-chat device join` again",
                ));
            }
            Waited::Cancelled => {
                return Err(Failure::new(
                    RUNTIME,
                    "stopped; nothing changed (this home keeps its new key; `device join` again makes a new request)",
                ));
            }
        };
        // Counter-signed at most once: this request's answer slot is written once, and this
        // process answers one offer only.
        let checked = pair::check_offer(&request, &key, offer.as_bytes());
        let answer = pair::make_answer(&request, &key, checked.as_ref().map(|(sig, _)| sig));
        let answer_put = put(
            &request,
            Slot::Answer,
            String::from_utf8(answer).expect("JSON"),
        );
        let sent = conn.pair_put(&answer_put).await;
        let (_, offered_chain) = checked.map_err(|err| {
            Failure::new(
                failure::REFUSED,
                format!(
                    "refused the offer ({}): {err}; nothing was counter-signed. Run `kez-chat device join` again",
                    err.code()
                ),
            )
        })?;
        sent.map_err(Failure::client)?;
        tell!("counter-signed the link adding this device; waiting for it to be appended");
        let sync = match wait_for(&conn, &request, Slot::Sync, "your contacts").await? {
            Waited::Got(sync) => sync,
            Waited::Expired | Waited::Cancelled => {
                return Err(Failure::new(
                    RUNTIME,
                    "stopped before the other device sent your contacts. If `kez-chat devices` on the other device lists this one, revoke it there (`kez-chat device revoke NAME`) and pair a new home (--home DIR): a key is added once; else nothing changed",
                ));
            }
        };
        let _ = conn.close().await;
        let sealed = BASE64
            .decode(sync.as_bytes())
            .map_err(|_| Failure::new(failure::REFUSED, "the sync message is not base64"))?;
        let message = envelope::open(&key, &sealed).map_err(|err| {
            Failure::new(
                failure::REFUSED,
                format!("the sync message does not open: {err}"),
            )
        })?;
        // Now an active device (the chain says so, verified here): the device profile.
        let conn = Connection::connect_with(
            &url,
            key.clone(),
            Connection::options(&key),
            self.plaintext(),
        )
        .await
        .map_err(Failure::client)?
        .as_device_of(identity);
        let chain = conn.chain(&identity).await.map_err(Failure::client)?;
        if !chain.extends(offered_chain.seq(), offered_chain.head()) {
            return Err(Failure::new(
                failure::REFUSED,
                "the chain the server has now does not extend the one the other device offered",
            ));
        }
        let sync: Sync =
            pair::check_sync(&request, &chain, &message).map_err(|err| pair_failure(&err))?;
        let store = self.store()?;
        let mut copied = 0;
        for contact in &sync.contacts {
            match pin_synced(&conn, &store, contact).await {
                Ok(()) => copied += 1,
                Err(err) => tell!(
                    "kez-chat: contact {} not copied: {err}; `kez-chat add {}` adds it",
                    display::inline(&contact.handle),
                    display::inline(&contact.handle)
                ),
            }
        }
        let _ = conn.close().await;
        self.config.server = Some(sync.server.clone());
        self.config.handle = Some(sync.handle.clone());
        self.config.identity = Some(identity);
        self.config.allow_plaintext = sync.allow_plaintext || self.plaintext_flag;
        self.home.save_config(&self.config).map_err(Failure::home)?;
        say!(
            "This home is now device {} ({kind}) of {} ({device}); {} copied.",
            display::inline(&name),
            sync.handle,
            display::plural(copied, "contact")
        );
        Ok(())
    }

    /// `device add 'kez-pair:…' [--yes]`: adds the device of a request the user pasted.
    pub(crate) async fn add_device(&self, line: &str, yes: bool) -> Result<(), Failure> {
        let key = self.key()?;
        let me = key.public_key();
        let request = PairRequest::parse(line, now()).map_err(|err| pair_failure(&err))?;
        let conn = self.connect().await?;
        let links = conn
            .chain_links(&conn.identity())
            .await
            .map_err(Failure::client)?;
        let chain = VerifiedChain::verify(&links).map_err(|err| {
            Failure::new(RUNTIME, format!("the own chain does not verify: {err}"))
        })?;
        request
            .check_for_chain(&chain)
            .map_err(|err| pair_failure(&err))?;
        tell!(
            "Add a device to {}:\n  name         {}\n  kind         {}\n  key          {}\n  fingerprint  {}",
            display::inline(&request.handle),
            display::inline(&request.name),
            request.kind,
            request.device,
            request.fingerprint()
        );
        if !yes {
            tell_part!(
                "Does the new device show this fingerprint, and do you want to add it? [y/N] "
            );
            let answer = term::read_line().await?.unwrap_or_default();
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                return Err(Failure::new(USAGE, "not confirmed; nothing changed"));
            }
        }
        let link = request.link(&chain, me, now());
        let offer =
            pair::make_offer(&request, &link, &links, &key).map_err(|err| pair_failure(&err))?;
        conn.pair_put(&put(
            &request,
            Slot::Offer,
            String::from_utf8(offer).expect("JSON"),
        ))
        .await
        .map_err(Failure::client)?;
        let answer = match wait_for(&conn, &request, Slot::Answer, "the new device").await? {
            Waited::Got(answer) => answer,
            Waited::Expired | Waited::Cancelled => {
                return Err(Failure::new(
                    RUNTIME,
                    "the new device did not answer in time; nothing changed",
                ));
            }
        };
        let ready = pair::check_answer(&request, &link, answer.as_bytes()).map_err(|err| {
            Failure::new(
                failure::REFUSED,
                format!("{err} [{}]; nothing was added to your chain", err.code()),
            )
        })?;
        let signed = ready
            .sign(&key)
            .map_err(|err| Failure::new(RUNTIME, format!("cannot sign the link: {err}")))?;
        let head = crate::append_device_link(&conn, &signed).await?;
        tell!(
            "added {} ({}) at link {}; sending it your contacts",
            display::inline(&request.name),
            request.kind,
            head.seq
        );
        let store = self.store()?;
        let contacts: Vec<SyncContact> = store
            .contacts()
            .map_err(Failure::store)?
            .into_iter()
            .map(|contact| SyncContact {
                handle: contact.handle,
                key: contact.key,
                seq: contact.chain_seq,
                head: contact.chain_head,
            })
            .collect();
        let count = contacts.len();
        let sync = Sync {
            nonce: request.nonce.to_hex(),
            identity: conn.identity(),
            handle: self.handle()?.to_owned(),
            server: self.server()?,
            allow_plaintext: self.config.allow_plaintext,
            contacts,
        };
        let body = serde_json::to_vec(&sync).expect("JSON");
        let (_, sealed) = envelope::seal(&key, &request.device, SYNC_CONTENT_TYPE, &body, now())
            .map_err(|err| {
                Failure::new(
                    RUNTIME,
                    format!("the device is added, but its contacts do not fit one message ({err}); add them there with `kez-chat add`"),
                )
            })?;
        conn.pair_put(&put(&request, Slot::Sync, BASE64.encode(&sealed)))
            .await
            .map_err(|err| {
                Failure::new(
                    RUNTIME,
                    format!("the device is added, but sending it your contacts failed: {err}"),
                )
            })?;
        say!(
            "Added device {} ({}) {} at link {}; sent it {} and your settings.",
            display::inline(&request.name),
            request.kind,
            request.device,
            head.seq,
            display::plural(count, "contact")
        );
        Ok(())
    }
}

/// Pins a contact the other device sent: the identity it pinned, with the chain verified here,
/// which must extend the state the other device verified.
async fn pin_synced(
    conn: &Connection,
    store: &kez_client::Store,
    contact: &SyncContact,
) -> Result<(), String> {
    let domain = contact.handle.rsplit('@').next().unwrap_or_default();
    let chain = conn
        .chain_at(&contact.key, domain)
        .await
        .map_err(|err| err.to_string())?;
    if chain.chain_id() != contact.key || !chain.extends(contact.seq, contact.head) {
        return Err("its chain does not extend the one your other device verified".into());
    }
    store
        .pin(&contact.handle, &chain, now())
        .map_err(|err| err.to_string())?;
    Ok(())
}

/// Parses `--kind`.
pub(crate) fn parse_kind(text: &str) -> Result<DeviceKind, String> {
    match text.parse::<DeviceKind>() {
        Ok(DeviceKind::Paper) => Err("a paper key is made by `kez-chat paperkey`".into()),
        Ok(kind) => Ok(kind),
        Err(_) => Err("one of cli, desktop, mobile".into()),
    }
}
