//! Chat beyond text (PROTOCOL.md §8.6): the commands that edit, delete, react to and reply to
//! messages and set a conversation's timer; what the service does with such changes when they
//! arrive; delivery and read receipts; desktop notifications; and how a conversation is shown
//! with its changes applied.
//!
//! A change is an ordinary end-to-end message of its own content type. Received changes are
//! applied by the service from the store's unshown messages (applying is idempotent, so a
//! service killed between applying and marking them handled applies them again), never trusted
//! beyond the store's rules (`Store::apply_change`: only the original sender edits or deletes,
//! only within the conversation).

use std::collections::BTreeMap;

use kez_client::store::{ChatChange, MessageView};
use kez_client::{Connection, Contact, Direction, Store, Undelivered, UndeliveredNote};
use kez_core::PublicKey;
use kez_core::chat::{
    ChatContent, Delete, Edit, Reaction, Receipt, ReceiptKind, Reply, Timer, may_change,
};
use kez_core::envelope::MessageId;
use kez_core::file::FILE_OFFER_CONTENT_TYPE;
use serde_json::{Value, json};

use crate::failure::{self, Failure, NOT_FOUND, USAGE};
use crate::service::Event;
use crate::term::{say, tell};
use crate::{App, TEXT, body_text, clock, deliver, display, print_json, recipient};

/// The shortest message id prefix a command takes.
const MIN_ID_PREFIX: usize = 4;

/// What a change command sends.
pub(crate) enum Change {
    Edit(String),
    Delete,
    React { emoji: String, remove: bool },
    Reply(String),
}

impl App {
    /// `edit`, `delete`, `react`, `reply`: sends the change of the message `target` (an id or
    /// a unique prefix of one in the conversation with `handle`) and applies it here.
    pub(crate) async fn change(
        &self,
        handle: &str,
        target: &str,
        change: Change,
        json: bool,
    ) -> Result<(), Failure> {
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let contact = recipient(&conn, &store, self.handle()?, &full).await?;
        let id = find_message(&store, &contact, target)?;
        let content = match change {
            Change::Edit(text) => ChatContent::Edit(Edit { id, text }),
            Change::Delete => ChatContent::Delete(Delete { id }),
            Change::React { emoji, remove } => {
                ChatContent::Reaction(Reaction { id, emoji, remove })
            }
            Change::Reply(text) => ChatContent::Reply(Reply { id, text }),
        };
        self.send_change(&conn, &store, &contact, content, json)
            .await
    }

    /// `timer @name DURATION`: the conversation's disappearing-message timer, for both sides.
    pub(crate) async fn timer(
        &self,
        handle: &str,
        duration: &str,
        json: bool,
    ) -> Result<(), Failure> {
        let seconds = parse_duration(duration)?;
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let contact = recipient(&conn, &store, self.handle()?, &full).await?;
        self.send_change(
            &conn,
            &store,
            &contact,
            ChatContent::Timer(Timer { seconds }),
            json,
        )
        .await?;
        match seconds {
            0 => tell!("messages with {} no longer disappear", contact.handle),
            _ => tell!(
                "messages with {} sent from now on disappear {} after they were sent, on every device",
                contact.handle,
                describe_duration(seconds)
            ),
        }
        Ok(())
    }

    /// Sends `content` to `contact` (and the own other devices) and applies it here.
    async fn send_change(
        &self,
        conn: &Connection,
        store: &Store,
        contact: &Contact,
        content: ChatContent,
        json: bool,
    ) -> Result<(), Failure> {
        let body = content
            .encode()
            .map_err(|err| Failure::new(USAGE, format!("cannot send that: {err}")))?;
        // The peer's rules, checked here first: what it would refuse is not sent.
        let own = conn.identity();
        if let Some((kind, ids)) = content.change() {
            for id in ids {
                let Some(target) = store.message(&contact.key, &id).map_err(Failure::store)? else {
                    continue;
                };
                let target_sender = match target.message.direction {
                    Direction::Incoming => contact.key,
                    Direction::Outgoing => own,
                };
                may_change(
                    &target_sender,
                    &target.message.content_type,
                    true,
                    &own,
                    kind,
                )
                .map_err(|err| {
                    Failure::new(
                        failure::REFUSED,
                        format!(
                            "cannot do that to message {}: {err}; nothing was sent",
                            short(&id)
                        ),
                    )
                })?;
            }
        }
        let sent = deliver(conn.clone(), store, contact, content.content_type(), &body).await?;
        let change = ChatChange {
            peer: contact.key,
            sender: own,
            id: sent.id,
            time: sent.time,
            content,
        };
        if let Err(err) = store.apply_change(&own, &change) {
            tell!("note: sent, but not applied here: {err}");
        }
        if json {
            print_json(&json!({"id": sent.id.to_string(), "to": contact.handle}));
        } else {
            say!("{}", sent.id);
        }
        Ok(())
    }

    /// `settings [KEY VALUE]`: shows the settings, or changes one.
    pub(crate) fn settings(
        &self,
        key: Option<&str>,
        value: Option<&str>,
        json: bool,
    ) -> Result<(), Failure> {
        let mut config = self.config.clone();
        if let Some(key) = key {
            let Some(value) = value else {
                return Err(Failure::new(
                    USAGE,
                    format!("give {key} a value: on or off"),
                ));
            };
            let on = match value {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                other => {
                    return Err(Failure::new(USAGE, format!("{other:?} is not on or off")));
                }
            };
            match key {
                "read-receipts" => config.read_receipts = on,
                "notifications" => config.notifications = on,
                "typing" => config.typing = on,
                "presence" => config.presence = on,
                other => {
                    return Err(Failure::new(
                        USAGE,
                        format!(
                            "there is no setting {other:?}: the settings are read-receipts, notifications, typing and presence"
                        ),
                    ));
                }
            }
            self.home.save_config(&config).map_err(Failure::home)?;
        }
        let onoff = |on: bool| if on { "on" } else { "off" };
        if json {
            print_json(&json!({
                "read_receipts": config.read_receipts,
                "notifications": config.notifications,
                "typing": config.typing,
                "presence": config.presence,
            }));
        } else {
            say!(
                "read-receipts  {}  (tell people when you read their messages)",
                onoff(config.read_receipts)
            );
            say!(
                "notifications  {}  (a desktop notification for each message that arrives)",
                onoff(config.notifications)
            );
            say!(
                "typing         {}  (tell contacts when you are typing: `kez-chat typing @name`)",
                onoff(config.typing)
            );
            say!(
                "presence       {}  (tell contacts when your kez-chat service is online)",
                onoff(config.presence)
            );
        }
        Ok(())
    }

    /// `name "Display Name" [--avatar FILE]`: tells every contact (and the own other devices)
    /// the name and picture to show beside this identity's handle, in a signed message.
    pub(crate) async fn set_name(
        &self,
        name: &str,
        avatar: Option<&std::path::Path>,
        json: bool,
    ) -> Result<(), Failure> {
        let avatar = match avatar {
            Some(path) => Some(read_avatar(path)?),
            None => None,
        };
        let profile = kez_core::chat::Profile {
            display_name: name.trim().to_owned(),
            avatar,
        };
        let content = ChatContent::Profile(profile.clone());
        let body = content
            .encode()
            .map_err(|err| Failure::new(USAGE, format!("cannot use that: {err}")))?;
        let store = self.store()?;
        let conn = self.connect().await?;
        conn.own_devices(&store, self.handle()?)
            .await
            .map_err(Failure::client)?;
        // Of two profiles the later second wins (§8.6; within a second, the larger id): a new
        // one is sent in a later second than the last, so it always replaces it.
        if let Ok(Some((_, last))) = store.profile(&conn.identity()) {
            while kez_client::now() <= last {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let contacts = store.contacts().map_err(Failure::store)?;
        let mut told = Vec::new();
        let mut kept = None;
        for contact in &contacts {
            match deliver(conn.clone(), &store, contact, content.content_type(), &body).await {
                Ok(sent) => {
                    kept.get_or_insert((sent.time, sent.id));
                    told.push(contact.handle.clone());
                }
                Err(failure) => tell!(
                    "note: {} was not told: {}",
                    contact.handle,
                    display::inline(&failure.message)
                ),
            }
        }
        let (time, id) = kept.unwrap_or_else(|| (kez_client::now(), MessageId::random()));
        store
            .set_profile(&conn.identity(), time, id, &profile)
            .map_err(Failure::store)?;
        if json {
            print_json(&json!({"display_name": profile.display_name, "told": told}));
        } else {
            tell!(
                "your name is now \"{}\"{}; told {}",
                display::inline(&profile.display_name),
                if profile.avatar.is_some() {
                    ", with a picture"
                } else {
                    ""
                },
                display::plural(told.len(), "contact")
            );
        }
        Ok(())
    }

    /// `typing @name [--stop]`: tells the contact's devices that the person is typing (or
    /// stopped), live; only when `settings typing on`.
    pub(crate) async fn typing(&self, handle: &str, typing: bool) -> Result<(), Failure> {
        if !self.config.typing {
            return Err(Failure::new(
                USAGE,
                "typing notices are off: `kez-chat settings typing on` turns them on",
            ));
        }
        let full = self.full_handle(handle)?;
        let store = self.store()?;
        let conn = self.connect().await?;
        let contact = recipient(&conn, &store, self.handle()?, &full).await?;
        conn.send_live(
            &contact,
            &ChatContent::Typing(kez_core::chat::Typing { typing }),
        )
        .await
        .map_err(|err| Failure::new(crate::failure::RUNTIME, err.to_string()))?;
        Ok(())
    }

    /// Marks the conversation with `peer` read and, unless turned off, tells the peer which
    /// of its messages were read.
    pub(crate) async fn mark_read(&self, store: &Store, peer: &PublicKey) {
        let ids = match store.mark_read(peer) {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!("cannot mark the conversation read: {err}");
                return;
            }
        };
        // The setting as it is now (the service's own config is as it was when it started).
        let read_receipts = self
            .home
            .config()
            .map_or(self.config.read_receipts, |config| config.read_receipts);
        if ids.is_empty() || !read_receipts {
            return;
        }
        let Ok(Some(contact)) = store.contact_by_key(peer) else {
            return;
        };
        let Ok(conn) = self.connect().await else {
            return;
        };
        // In the service the receipts go out behind the command, which only showed what it
        // read (a view waits for it); a command on its own sends them before it exits.
        if self.held.outlives_commands() {
            tokio::spawn(async move {
                send_receipts(&conn, &contact, ReceiptKind::Read, ids).await;
            });
        } else {
            send_receipts(&conn, &contact, ReceiptKind::Read, ids).await;
        }
    }
}

/// The message `target` names in the conversation with `contact`: its id, or a unique prefix
/// of at least [`MIN_ID_PREFIX`] hex digits.
fn find_message(store: &Store, contact: &Contact, target: &str) -> Result<MessageId, Failure> {
    let target = target.trim().to_ascii_lowercase();
    if target.len() < MIN_ID_PREFIX || !target.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Failure::new(
            USAGE,
            format!(
                "{target:?} is not a message id: give its first {MIN_ID_PREFIX} or more hex digits (`kez-chat history {} --ids` shows them)",
                contact.handle
            ),
        ));
    }
    let messages = store.messages(&contact.key).map_err(Failure::store)?;
    let found: Vec<MessageId> = messages
        .iter()
        .map(|view| view.message.id)
        .filter(|id| id.to_string().starts_with(&target))
        .collect();
    match found.as_slice() {
        [id] => Ok(*id),
        [] => Err(Failure::new(
            NOT_FOUND,
            format!(
                "no message {target} in the conversation with {}",
                contact.handle
            ),
        )),
        _ => Err(Failure::new(
            USAGE,
            format!("{target} names {} messages: give more digits", found.len()),
        )),
    }
}

/// `30s`, `10m`, `1h`, `7d`, a number of seconds, or `off`.
fn parse_duration(text: &str) -> Result<u32, Failure> {
    let bad = || {
        Failure::new(
            USAGE,
            format!("{text:?} is not a duration: e.g. 30s, 10m, 1h, 7d, or off"),
        )
    };
    if text == "off" {
        return Ok(0);
    }
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(scale)
        .and_then(|seconds| u32::try_from(seconds).ok())
        .filter(|seconds| *seconds <= kez_core::chat::MAX_TIMER_SECONDS)
        .ok_or_else(|| {
            Failure::new(
                USAGE,
                format!("{text} is longer than the limit of 365 days"),
            )
        })
}

/// A timer's length for people.
fn describe_duration(seconds: u32) -> String {
    match seconds {
        s if s % 86_400 == 0 => format!("{} day(s)", s / 86_400),
        s if s % 3_600 == 0 => format!("{} hour(s)", s / 3_600),
        s if s % 60 == 0 => format!("{} minute(s)", s / 60),
        s => format!("{s} second(s)"),
    }
}

/// Sends a receipt of `kind` for `ids` to `contact`; a failure is only logged (a receipt is a
/// courtesy, and the next one says as much).
async fn send_receipts(
    conn: &Connection,
    contact: &Contact,
    kind: ReceiptKind,
    ids: Vec<MessageId>,
) {
    for chunk in ids.chunks(kez_core::chat::MAX_RECEIPT_IDS) {
        let receipt = ChatContent::Receipt(Receipt {
            kind,
            ids: chunk.iter().copied().collect(),
        });
        let body = match receipt.encode() {
            Ok(body) => body,
            Err(err) => {
                tracing::warn!("cannot write a receipt: {err}");
                return;
            }
        };
        if let Err(err) = conn.send(contact, receipt.content_type(), &body).await {
            tracing::warn!("cannot send a receipt to {}: {err}", contact.handle);
        }
    }
}

/// Whether a content type is one people read as a message (and so is receipted and notified).
fn shown_as_message(content_type: &str) -> bool {
    matches!(
        content_type,
        TEXT | FILE_OFFER_CONTENT_TYPE | kez_core::chat::REPLY_CONTENT_TYPE
    )
}

/// What the service does with messages it just received: delivery receipts to their senders
/// and, when turned on, a desktop notification each.
pub(crate) async fn received(
    app: &App,
    store: &Store,
    conn: &Connection,
    messages: &[kez_core::envelope::Message],
) {
    let notifications = app
        .home
        .config()
        .map_or(app.config.notifications, |config| config.notifications);
    let mut by_contact: BTreeMap<String, (Contact, Vec<MessageId>)> = BTreeMap::new();
    for message in messages {
        if !shown_as_message(&message.content_type) {
            continue;
        }
        let Ok(Some(contact)) = store.contact_by_key(&message.from) else {
            continue;
        };
        if notifications {
            notify(
                &contact.handle,
                &body_text(&message.id, &message.content_type, &message.body),
            );
        }
        by_contact
            .entry(contact.handle.clone())
            .or_insert_with(|| (contact, Vec::new()))
            .1
            .push(message.id);
    }
    for (contact, ids) in by_contact.into_values() {
        send_receipts(conn, &contact, ReceiptKind::Delivered, ids).await;
    }
}

/// Applies the received changes among the unshown messages (§8.6) and marks them handled;
/// answers what the listeners should hear about them.
pub(crate) fn apply_received(store: &Store, own: &PublicKey) -> Vec<Event> {
    let Ok(unshown) = store.unshown() else {
        return Vec::new();
    };
    let mut handled = Vec::new();
    let mut events = Vec::new();
    for (order, message) in unshown {
        if !kez_core::chat::CONTENT_TYPES.contains(&message.content_type.as_str()) {
            continue;
        }
        handled.push(order);
        let content = match ChatContent::decode(&message.content_type, &message.body) {
            Ok(content) => content,
            Err(err) => {
                tracing::warn!(
                    "dropping a {} that is not valid: {err}",
                    message.content_type
                );
                continue;
            }
        };
        if content.is_ephemeral() {
            continue;
        }
        let (peer, sender) = match message.direction {
            Direction::Incoming => {
                let sender = match store.contact_by_key(&message.from) {
                    Ok(Some(contact)) => contact.key,
                    _ => message.from,
                };
                (sender, sender)
            }
            Direction::Outgoing => (message.to, *own),
        };
        if let ChatContent::Profile(profile) = &content {
            // What the sender says about itself: kept for the sender's identity only.
            let of = match message.direction {
                Direction::Incoming => sender,
                Direction::Outgoing => *own,
            };
            match store.set_profile(&of, message.time, message.id, profile) {
                Ok(true) if of != *own => {
                    events.push(Event::Note(format!(
                        "{} calls themselves \"{}\"",
                        crate::contact_handle(store, &of),
                        display::inline(&profile.display_name)
                    )));
                    events.push(Event::Changed(of));
                }
                Ok(_) => {}
                Err(err) => tracing::warn!("refusing a profile from {of}: {err}"),
            }
            continue;
        }
        let is_reply = matches!(content, ChatContent::Reply(_));
        let note = change_note(store, &peer, &sender, own, &content);
        let change = ChatChange {
            peer,
            sender,
            id: message.id,
            time: message.time,
            content,
        };
        match store.apply_change(own, &change) {
            Ok(_) => {
                if let Some(note) = note {
                    events.push(Event::Note(note));
                }
                events.push(Event::Changed(peer));
            }
            Err(err) => tracing::warn!("refusing a change from {sender}: {err}"),
        }
        // A reply is a message too: the listeners show it as one.
        if is_reply {
            handled.pop();
        }
    }
    if let Err(err) = store.mark_shown(&handled) {
        tracing::warn!("cannot mark changes handled: {err}");
    }
    events
}

/// A line about a change for the listeners (receipts and timers say nothing).
fn change_note(
    store: &Store,
    peer: &PublicKey,
    sender: &PublicKey,
    own: &PublicKey,
    content: &ChatContent,
) -> Option<String> {
    let who = if sender == own {
        "you".to_owned()
    } else {
        crate::contact_handle(store, sender)
    };
    let quoted = |id: &MessageId| {
        store
            .message(peer, id)
            .ok()
            .flatten()
            .and_then(|view| view.text)
            .map(|text| format!("\"{}\"", display::truncate(&display::inline(&text), 40)))
            .unwrap_or_else(|| format!("message {}", short(id)))
    };
    match content {
        ChatContent::Edit(edit) => Some(format!(
            "{who} edited {}: {}",
            quoted(&edit.id),
            display::inline(&edit.text)
        )),
        ChatContent::Delete(delete) => Some(format!("{who} deleted message {}", short(&delete.id))),
        ChatContent::Reaction(reaction) => Some(format!(
            "{who} {} {} {}",
            if reaction.remove {
                "took back"
            } else {
                "reacted"
            },
            display::inline(&reaction.emoji),
            quoted(&reaction.id)
        )),
        ChatContent::Timer(timer) => Some(match timer.seconds {
            0 => format!("{who} turned disappearing messages off"),
            seconds => format!(
                "{who} set messages to disappear after {}",
                describe_duration(seconds)
            ),
        }),
        _ => None,
    }
}

/// The first 8 hex digits of a message id.
fn short(id: &MessageId) -> String {
    id.to_string()[..8].to_owned()
}

/// Shows a desktop notification where the platform has a notifier (`notify-send`); nothing
/// otherwise. Peer text goes through `display` and is cut short.
fn notify(title: &str, text: &str) {
    let Some(notifier) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("notify-send"))
            .find(|candidate| candidate.is_file())
    }) else {
        return;
    };
    let spawned = std::process::Command::new(notifier)
        .arg("--app-name=kez-chat")
        .arg("--")
        .arg(display::inline(title))
        .arg(display::truncate(&display::inline(text), 200))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        // Reaped by a thread: a notifier is quick, and nothing waits for it.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(err) => tracing::debug!("no desktop notification: {err}"),
    }
}

/// One message of a conversation for people, with its changes: edited, deleted, the message
/// it replies to, reactions, and for the own messages whether they were delivered (✓) and
/// read (✓✓).
pub(crate) fn view_line(who: &str, view: &MessageView, ids: bool) -> String {
    let message = &view.message;
    let mut text = if view.deleted {
        "(deleted)".to_owned()
    } else {
        display::body(&match &view.text {
            Some(text) => text.clone(),
            None => body_text(&message.id, &message.content_type, &message.body),
        })
    };
    if let Some(reply_to) = &view.reply_to {
        text = format!("(reply to {}) {text}", short(reply_to));
    }
    if view.edited {
        text.push_str(" (edited)");
    }
    for (emoji, by) in &view.reactions {
        text.push_str(&format!(" [{} {}]", display::inline(emoji), by.len()));
    }
    if message.direction == Direction::Outgoing {
        if view.read {
            text.push_str(" ✓✓");
        } else if view.delivered {
            text.push_str(" ✓");
        }
    }
    let id = if ids {
        format!("{} ", short(&message.id))
    } else {
        String::new()
    };
    format!("{id}[{}] {who}: {text}", clock(message.time))
}

/// Whether messages with `contact` are forward secret (PROTOCOL.md §15): this device has its
/// Olm key bound (`bound_here`) and every device they go to has one in its chain, or else
/// what is not.
pub(crate) fn secrecy_note(contact: &kez_client::Contact, bound_here: bool) -> String {
    if !bound_here {
        return format!(
            "note: messages with {} are not forward secret: this device has no Olm key in your sigchain yet (its server may have no key service: see the service's log)",
            contact.handle
        );
    }
    let without = contact.without_olm_key();
    if without.is_empty() {
        return format!(
            "messages with {} are forward secret: a key stolen later does not open them",
            contact.handle
        );
    }
    let names: Vec<String> = without
        .iter()
        .map(|key| {
            contact
                .devices
                .iter()
                .find(|device| device.key == *key)
                .map_or_else(
                    || key.to_string(),
                    |device| crate::display::inline(&device.name),
                )
        })
        .collect();
    format!(
        "note: messages to {} are not forward secret on {} (no Olm key in their sigchain yet: an older client); a key stolen later opens them",
        contact.handle,
        names.join(", ")
    )
}

/// The note that a sent message did not reach a device of `handle` (the home server's
/// bounce): `[time] ⚠ not delivered to @bob@b.example: <what went wrong> (<reason>)`. The
/// server's words, which may carry a peer's, go through `display`.
pub(crate) fn undelivered_line(handle: &str, undelivered: &Undelivered) -> String {
    format!(
        "[{}] ⚠ not delivered to {}: {} ({})",
        clock(undelivered.time),
        display::inline(handle),
        display::inline(&undelivered.message),
        display::inline(&undelivered.reason)
    )
}

/// `listen --json`'s line for a sent message that did not reach a device of `handle`:
/// `{"type":"bounce","id","peer","to_handle"}` and the [`undelivered_json`] members.
pub(crate) fn bounce_json(handle: &str, note: &UndeliveredNote) -> Value {
    let mut value = undelivered_json(&note.undelivered);
    value["type"] = json!("bounce");
    value["id"] = json!(note.id.to_string());
    value["peer"] = json!(note.peer.to_string());
    value["to_handle"] = json!(handle);
    value
}

/// An [`Undelivered`] as JSON (exact text).
pub(crate) fn undelivered_json(undelivered: &Undelivered) -> Value {
    json!({
        "device": undelivered.device.to_string(),
        "domain": undelivered.domain,
        "reason": undelivered.reason,
        "message": undelivered.message,
        "queued_at": undelivered.queued_at,
        "time": undelivered.time,
    })
}

/// One message of a conversation as JSON: the stored message's members and its state.
pub(crate) fn view_json(view: &MessageView, stored: Value) -> Value {
    let mut value = stored;
    if let Some(text) = &view.text {
        value["text"] = json!(text);
    }
    if view.deleted {
        value["text"] = json!("");
    }
    value["edited"] = json!(view.edited);
    value["deleted"] = json!(view.deleted);
    value["reply_to"] = json!(view.reply_to.map(|id| id.to_string()));
    value["reactions"] = Value::Object(
        view.reactions
            .iter()
            .map(|(emoji, by)| {
                (
                    emoji.clone(),
                    json!(by.iter().map(ToString::to_string).collect::<Vec<_>>()),
                )
            })
            .collect(),
    );
    value["delivered"] = json!(view.delivered);
    value["read"] = json!(view.read);
    value["expires_at"] = json!(view.expires_at);
    value["undelivered"] = view.undelivered.iter().map(undelivered_json).collect();
    value
}

/// Tells every contact the own presence (`settings presence on` only); failures are logged.
pub(crate) async fn announce_presence(
    app: &App,
    store: &Store,
    conn: &Connection,
    state: kez_core::chat::PresenceState,
) {
    let on = app
        .home
        .config()
        .map_or(app.config.presence, |config| config.presence);
    if !on {
        return;
    }
    let Ok(contacts) = store.contacts() else {
        return;
    };
    let presence = ChatContent::Presence(kez_core::chat::Presence { state });
    for contact in contacts {
        if let Err(err) = conn.send_live(&contact, &presence).await {
            tracing::debug!("no presence to {}: {err}", contact.handle);
        }
    }
}

/// A live notice for people: `@bob is typing…`, `@bob is online`.
pub(crate) fn live_note(notice: &kez_client::LiveNotice) -> Option<String> {
    let who = display::inline(&notice.handle);
    match &notice.content {
        ChatContent::Typing(typing) if typing.typing => Some(format!("{who} is typing…")),
        ChatContent::Typing(_) => Some(format!("{who} stopped typing")),
        ChatContent::Presence(presence) => Some(format!(
            "{who} is {}",
            match presence.state {
                kez_core::chat::PresenceState::Online => "online",
                kez_core::chat::PresenceState::Away => "away",
                kez_core::chat::PresenceState::Offline => "offline",
            }
        )),
        _ => None,
    }
}

/// A live notice as a `listen --json --events` line: `typing` or `presence`; `null` for
/// other content.
pub(crate) fn live_json(notice: &kez_client::LiveNotice) -> serde_json::Value {
    let (from, handle) = (notice.identity.to_string(), &notice.handle);
    match &notice.content {
        ChatContent::Typing(typing) => serde_json::json!({
            "typing": { "from": from, "handle": handle, "typing": typing.typing }
        }),
        ChatContent::Presence(presence) => serde_json::json!({
            "presence": {
                "from": from,
                "handle": handle,
                "state": match presence.state {
                    kez_core::chat::PresenceState::Online => "online",
                    kez_core::chat::PresenceState::Away => "away",
                    kez_core::chat::PresenceState::Offline => "offline",
                },
            }
        }),
        _ => serde_json::Value::Null,
    }
}

/// An avatar from a file: PNG, JPEG or WebP by its first bytes, at most
/// [`kez_core::chat::MAX_AVATAR_BYTES`].
fn read_avatar(path: &std::path::Path) -> Result<kez_core::chat::Avatar, Failure> {
    use kez_core::chat::{Avatar, ImageType, MAX_AVATAR_BYTES};
    let metadata = std::fs::metadata(path)
        .map_err(|err| Failure::new(USAGE, format!("cannot read {}: {err}", path.display())))?;
    if metadata.len() > MAX_AVATAR_BYTES as u64 {
        return Err(Failure::new(
            USAGE,
            format!(
                "{} is {}; a picture may have at most {MAX_AVATAR_BYTES} bytes: make it smaller (e.g. 256×256)",
                path.display(),
                crate::files::bytes(metadata.len())
            ),
        ));
    }
    let data = std::fs::read(path)
        .map_err(|err| Failure::new(USAGE, format!("cannot read {}: {err}", path.display())))?;
    let image_type = [ImageType::Png, ImageType::Jpeg, ImageType::Webp]
        .into_iter()
        .find(|image_type| image_type.matches(&data))
        .ok_or_else(|| {
            Failure::new(
                USAGE,
                format!("{} is not a PNG, JPEG or WebP picture", path.display()),
            )
        })?;
    Ok(Avatar { image_type, data })
}

/// What a contact calls themselves, for people: `"Alice L."` (always beside the handle, never
/// instead of it), or nothing.
pub(crate) fn shown_name(store: &Store, identity: &PublicKey) -> Option<String> {
    let (profile, _) = store.profile(identity).ok()??;
    Some(format!("\"{}\"", display::inline(&profile.display_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's words in a bounce (which may carry a peer's) are escaped for people and
    /// exact in JSON.
    #[test]
    fn an_undelivered_note_escapes_the_servers_words_and_json_keeps_them() {
        let device = kez_core::SecretKey::from_seed(&[3; 32]).public_key();
        let undelivered = Undelivered {
            device,
            domain: "b.localhost".into(),
            reason: "unknown_recipient\u{202e}".into(),
            message: "no such\nuser \u{1b}[31m".into(),
            queued_at: 5,
            time: 0,
        };
        let line = undelivered_line("@bob@b.localhost", &undelivered);
        assert!(
            line.contains("] ⚠ not delivered to @bob@b.localhost: no such"),
            "{line}"
        );
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{line:?}"
        );
        let note = UndeliveredNote {
            peer: device,
            id: MessageId::from_bytes([7; 16]),
            undelivered: undelivered.clone(),
        };
        let json = bounce_json("@bob@b.localhost", &note);
        assert_eq!(json["type"], "bounce");
        assert_eq!(json["id"], "07".repeat(16));
        assert_eq!(json["to_handle"], "@bob@b.localhost");
        assert_eq!(json["device"], device.to_string());
        assert_eq!(json["message"], undelivered.message);
        assert_eq!(json["reason"], undelivered.reason);
    }
}
