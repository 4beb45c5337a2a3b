//! The upgrade from the previous release's inbox: [`move_legacy_inbox`] moves every undelivered
//! message out of its work-queue stream (one durable consumer per user) into the current inbox
//! stream, then removes the old stream.
//!
//! The previous release (0.1) kept undelivered messages in stream `KEZ_INBOX`: work-queue
//! retention, subjects `kez.inbox.<recipient key hex>`, a durable pull consumer
//! `inbox_<key hex>` per registered user, each message stored with `Nats-Msg-Id` = its message
//! id. A stream's retention cannot be changed from work-queue to limits (nats-server refuses with
//! error 10052), so the current release keeps its inbox in a stream of another name, on subjects
//! that do not overlap `kez.inbox.*`: both streams can exist while messages move.
//!
//! The move is crash-safe and idempotent by construction, without state of its own:
//! - a message leaves the old stream only after the target stream acknowledged storing it, so a
//!   crash of the server loses nothing, nor does one of the broker when it fsyncs what it
//!   acknowledges (`sync_interval: always`, as in every config kez-chat writes);
//! - a crash between that acknowledgement and the removal leaves the message in the old stream,
//!   and the next run publishes it again with the same `Nats-Msg-Id`: within the target's
//!   duplicate window (120 s) the broker drops the copy (counted in [`Moved::duplicates`]);
//!   later, the second copy is stored and the client drops it on receipt by its message id, as
//!   it drops every redelivery;
//! - several instances may run it at once: each reads, publishes and removes the same messages,
//!   the broker stores each once (same id, same window), and a message, consumer or stream
//!   another instance removed first counts as done. Their [`Moved`] counts overlap;
//! - a publish the target refuses (its byte limit, the broker's storage, a full inbox) stops the
//!   move with an error saying what to do; every message the target did not acknowledge is
//!   still in the old stream, and the next run goes on from there.
//!
//! Messages keep their order per recipient (published in sequence order on one connection),
//! unless a refusal stopped a run in the middle of a window. Memory is bounded: messages are
//! read one by one in sequence order, at most [`WINDOW`] of them held at once; the old stream is
//! emptied a window at a time, by a purge below the first message not moved.

use async_nats::jetstream::{self, context::PublishErrorKind, stream::Stream};
use futures::StreamExt;
use kez_core::PublicKey;

use crate::store::LEGACY_INBOX_STREAM as LEGACY_STREAM;

/// The prefix of the previous release's inbox subjects, `kez.inbox.<recipient key hex>` (0.1's
/// layout, kept only to move it). Its consumers were named `inbox_<key hex>`; every consumer of
/// [`LEGACY_STREAM`] is removed, whatever its name.
const LEGACY_SUBJECT_PREFIX: &str = "kez.inbox.";
/// The prefix of the consumers the previous release made, `inbox_<key hex>` (0.1's layout, kept
/// only to tell them from consumers an operator added, which are removed too but logged).
const LEGACY_CONSUMER_PREFIX: &str = "inbox_";
/// The only subject of [`LEGACY_STREAM`] once the move began: nothing publishes there, so an
/// instance of the previous release still running is refused (its sender told) instead of
/// storing a message into a stream that is about to be deleted. Overlaps no other subject.
const CLOSED_SUBJECT: &str = "kez.legacy-inbox-closed";
/// Every subject: the move reads all of the old stream's messages, whatever their subject.
const ALL_SUBJECTS: &str = ">";
/// Messages read, published and not yet acknowledged at once. Each is at most the old stream's
/// message size limit (65 KiB in 0.1), so about 4 MiB at most are held.
const WINDOW: usize = 64;
/// Consumers deleted at once.
const PARALLEL_DELETES: usize = 16;
/// How many consumer names one listing takes before deleting them (nats-server pages 1,024).
const CONSUMER_PAGE: usize = 1024;
/// Progress is logged every this many messages.
const PROGRESS_EVERY: u64 = 1000;
/// Passes over the old stream before giving up on messages that stay in it.
const PASSES: usize = 3;
/// How often a failed move asks whether the old stream is gone...
const GONE_CHECKS: usize = 3;
/// ... and how long it waits in between.
const GONE_CHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// What [`move_legacy_inbox`] did. All zero (the default) when there was no old stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Messages stored in the target stream by this run.
    pub moved: u64,
    /// Messages the target already held (same `Nats-Msg-Id` within its duplicate window: a run
    /// interrupted between publish and delete, or another instance moving at the same time);
    /// deleted from the old stream like the moved ones.
    pub duplicates: u64,
    /// Messages on a subject that names no valid key (`kez.inbox.<not a key>`, or any other
    /// subject an operator let into the old stream): nobody can receive them; logged at WARN
    /// and deleted.
    pub dropped: u64,
    /// Consumers of the old stream this run deleted.
    pub consumers_removed: u64,
    /// Whether this run deleted the (then empty) old stream.
    pub legacy_removed: bool,
}

/// Moves the previous release's undelivered messages into `target_stream`, each to
/// `new_subject(recipient key)`, and removes the old stream; see the module docs for why it is
/// safe to crash, repeat and run on several instances at once.
///
/// Without the old stream this is one `STREAM.INFO` and answers [`Moved::default`]. Otherwise,
/// in order:
/// 1. checks that `target_stream` exists (nothing is changed when it does not);
/// 2. deletes every consumer of the old stream (listing again until none is left);
/// 3. closes the old stream to new messages (its subjects become one nothing publishes to; the
///    stored messages keep theirs);
/// 4. moves every message in sequence order, [`WINDOW`] at a time: reads it (`STREAM.MSG.GET`
///    with `next_by_subj`), publishes its payload to `new_subject(key)` with its original
///    `Nats-Msg-Id` and `Nats-Expected-Stream: <target_stream>`, waits for the acknowledgement,
///    then removes it from the old stream (a purge below the first message of the window not
///    moved). A subject that names no valid key is dropped (logged at WARN, removed);
/// 5. deletes the old stream once it holds nothing.
///
/// The work is proportional to the old stream's messages and consumers: about 850 messages a
/// second on a busy 2-core VM with `sync_interval: always` (each publish is an fsync).
///
/// Only the payload and `Nats-Msg-Id` move; the stored time does not, so a moved message's age
/// in the target (its `max_age`) counts from the move.
///
/// The `js` context must be the server account's (the one owning both streams), and its
/// `new_subject` must yield subjects of `target_stream`: a publish the broker stores elsewhere,
/// or nowhere, is an error and the message stays where it was.
///
/// # Errors
///
/// A sentence for the operator: what failed, that nothing was lost, and what to do. The old
/// stream keeps every message not yet stored in the target; running again resumes.
pub async fn move_legacy_inbox(
    js: &jetstream::Context,
    target_stream: &str,
    new_subject: impl Fn(&PublicKey) -> String,
) -> Result<Moved, String> {
    let legacy = match js.get_stream(LEGACY_STREAM).await {
        Ok(stream) => stream,
        Err(err) if stream_not_found(&err) => return Ok(Moved::default()),
        Err(err) => {
            return Err(format!(
                "cannot tell whether the previous release's inbox stream {LEGACY_STREAM} exists: \
                 {err}; start the server again once the broker answers"
            ));
        }
    };
    let mut moved = Moved::default();
    match move_from(js, &legacy, target_stream, &new_subject, &mut moved).await {
        Ok(()) => Ok(moved),
        // A step failed because another instance deleted the stream under it (nats-server
        // answers "stream closed", 10051, while it deletes one): that instance finished.
        Err(_) if finished_elsewhere(js).await => Ok(gone(moved)),
        Err(err) => Err(err),
    }
}

/// [`move_legacy_inbox`] once the old stream was found: `Ok` when the move is done, by this run
/// or by another instance.
async fn move_from(
    js: &jetstream::Context,
    legacy: &Stream,
    target_stream: &str,
    new_subject: &impl Fn(&PublicKey) -> String,
    moved: &mut Moved,
) -> Result<(), String> {
    let info = legacy.cached_info().clone();
    tracing::info!(
        messages = info.state.messages,
        consumers = info.state.consumer_count,
        from = LEGACY_STREAM,
        to = target_stream,
        "moving the undelivered messages of the previous release"
    );
    match js.get_stream(target_stream).await {
        Ok(_) => {}
        Err(err) => {
            return Err(format!(
                "cannot move the previous release's inbox ({LEGACY_STREAM}, {} messages): the \
                 target stream {target_stream} is not there ({err}); nothing was changed",
                info.state.messages
            ));
        }
    }

    let Some(removed) = remove_consumers(legacy).await? else {
        *moved = gone(*moved);
        return Ok(());
    };
    moved.consumers_removed = removed;
    if !info.config.subjects.iter().eq([CLOSED_SUBJECT]) {
        let mut closed = info.config.clone();
        closed.subjects = vec![CLOSED_SUBJECT.to_owned()];
        if let Err(err) = js.update_stream(&closed).await {
            return Err(format!(
                "cannot close the previous release's inbox stream {LEGACY_STREAM} to new \
                 messages before moving them: {err}; nothing was moved, start the server again"
            ));
        }
    }

    let mut first = 1;
    for _ in 0..PASSES {
        if !move_messages(js, legacy, target_stream, new_subject, first, moved).await? {
            *moved = gone(*moved);
            return Ok(());
        }
        // Closed, the stream takes no new messages (unless a server of the previous release
        // started meanwhile: its start reopens it): empty means done.
        let state = match js.get_stream(LEGACY_STREAM).await {
            Ok(stream) => stream.cached_info().state.clone(),
            Err(err) if stream_not_found(&err) => {
                *moved = gone(*moved);
                return Ok(());
            }
            Err(err) => return Err(format!("cannot read {LEGACY_STREAM} after the move: {err}")),
        };
        if state.messages == 0 {
            match js.delete_stream(LEGACY_STREAM).await {
                Ok(status) => moved.legacy_removed = status.success,
                Err(err) if stream_not_found(&err) => {}
                Err(err) => {
                    return Err(format!(
                        "every message of the previous release's inbox was moved, but its empty \
                         stream {LEGACY_STREAM} could not be deleted: {err}; the next start \
                         deletes it"
                    ));
                }
            }
            tracing::info!(
                moved = moved.moved,
                duplicates = moved.duplicates,
                dropped = moved.dropped,
                consumers_removed = moved.consumers_removed,
                removed = moved.legacy_removed,
                "the previous release's inbox is moved"
            );
            return Ok(());
        }
        // Messages that came after this pass read past them (a reopened stream), or that a read
        // missed: another pass from the first.
        first = state.first_sequence;
    }
    Err(format!(
        "{LEGACY_STREAM} still holds messages after {PASSES} passes of the move; they stay \
         there, and the next start tries again"
    ))
}

/// `moved` when another instance finished the move meanwhile (the old stream is gone).
fn gone(moved: Moved) -> Moved {
    tracing::info!(
        moved = moved.moved,
        duplicates = moved.duplicates,
        dropped = moved.dropped,
        "the previous release's inbox stream is gone: another instance finished the move"
    );
    moved
}

/// Deletes every consumer of the old stream; `None` when the stream went away meanwhile.
///
/// Listed again from the start after each page is deleted (a listing pages by offset, which
/// deleting shifts), until a listing finds none or a page deletes none (a listing that lags
/// deletes another instance made; deleting the stream removes what is left).
async fn remove_consumers(legacy: &Stream) -> Result<Option<u64>, String> {
    let mut removed = 0;
    loop {
        let mut page = Vec::new();
        let mut names = legacy.consumer_names();
        while page.len() < CONSUMER_PAGE {
            match names.next().await {
                Some(Ok(name)) => page.push(name),
                Some(Err(err)) => {
                    return Err(format!(
                        "cannot list the consumers of the previous release's inbox stream \
                         {LEGACY_STREAM}: {err}; nothing was moved, start the server again"
                    ));
                }
                None => break,
            }
        }
        if page.is_empty() {
            return Ok(Some(removed));
        }
        let deletes = futures::stream::iter(page)
            .map(|name| async move {
                if !name.starts_with(LEGACY_CONSUMER_PREFIX) {
                    tracing::warn!(consumer = %name, stream = LEGACY_STREAM, "removing a consumer kez-chat did not make");
                }
                (legacy.delete_consumer(&name).await, name)
            })
            .buffer_unordered(PARALLEL_DELETES)
            .collect::<Vec<_>>()
            .await;
        let before = removed;
        for (result, name) in deletes {
            match result {
                Ok(_) => removed += 1,
                Err(err) => match consumer_code(&err) {
                    Some(jetstream::ErrorCode::CONSUMER_NOT_FOUND) => {}
                    Some(jetstream::ErrorCode::STREAM_NOT_FOUND) => return Ok(None),
                    _ => {
                        return Err(format!(
                            "cannot delete consumer {name} of the previous release's inbox \
                             stream {LEGACY_STREAM}: {err}; nothing was moved, start the server \
                             again"
                        ));
                    }
                },
            }
        }
        if removed == before {
            return Ok(Some(removed));
        }
    }
}

/// Moves the old stream's messages from sequence `first` on; `false` when the stream went away
/// meanwhile (another instance finished).
async fn move_messages(
    js: &jetstream::Context,
    legacy: &Stream,
    target: &str,
    new_subject: &impl Fn(&PublicKey) -> String,
    first: u64,
    moved: &mut Moved,
) -> Result<bool, String> {
    let mut next = first;
    loop {
        let mut batch = Vec::with_capacity(WINDOW);
        while batch.len() < WINDOW {
            match legacy
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(ALL_SUBJECTS)
                .send()
                .await
            {
                Ok(message) => {
                    next = message.sequence + 1;
                    batch.push(message);
                }
                Err(err) => match err.kind() {
                    jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
                    jetstream::stream::RawMessageErrorKind::JetStream(source)
                        if source.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                    {
                        return Ok(false);
                    }
                    _ => {
                        return Err(format!(
                            "cannot read message {next} of the previous release's inbox stream \
                             {LEGACY_STREAM}: {err}; nothing was lost, start the server again \
                             to go on with the move"
                        ));
                    }
                },
            }
        }
        if batch.is_empty() {
            return Ok(true);
        }
        let before = moved.moved + moved.duplicates + moved.dropped;
        let outcome = move_batch(js, legacy, target, new_subject, batch, next, moved).await;
        let after = moved.moved + moved.duplicates + moved.dropped;
        if after / PROGRESS_EVERY > before / PROGRESS_EVERY {
            tracing::info!(
                moved = moved.moved,
                duplicates = moved.duplicates,
                dropped = moved.dropped,
                "moving the previous release's inbox"
            );
        }
        match outcome {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(err) => return Err(err),
        }
    }
}

/// Publishes `batch` (at most [`WINDOW`] messages, every message of the old stream from the
/// first one's sequence to `end`, exclusive) to the target, then removes from the old stream
/// each message the target acknowledged, and each dropped one; `false` when the old stream went
/// away meanwhile.
///
/// Removing is a purge below the first message not moved (`end` when all were): every message
/// there was read by this run and is stored in the target (or dropped), whatever other
/// instances do meanwhile, since a message never appears below one already read. One request,
/// where a `STREAM.MSG.DELETE` per message erases each (nats-server overwrites the message on
/// disk by default): 6 ms a message with `sync_interval: always`, against 0.4 ms without the
/// erase. Messages moved after one that was not (a refusal stops the move) are deleted one by
/// one, without the erase.
async fn move_batch(
    js: &jetstream::Context,
    legacy: &Stream,
    target: &str,
    new_subject: &impl Fn(&PublicKey) -> String,
    batch: Vec<jetstream::message::StreamMessage>,
    end: u64,
    moved: &mut Moved,
) -> Result<bool, String> {
    let first = batch.first().map_or(end, |message| message.sequence);
    // The messages not moved, with why: the move stops at the first of them.
    let mut failures: Vec<(u64, String)> = Vec::new();
    // The sequences moved (or dropped), in order.
    let mut done = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for message in batch {
        let Some(key) = legacy_recipient(&message.subject) else {
            tracing::warn!(
                seq = message.sequence,
                subject = %message.subject,
                bytes = message.payload.len(),
                "dropping a message of the previous release's inbox that names no valid recipient"
            );
            moved.dropped += 1;
            done.push(message.sequence);
            continue;
        };
        let subject = new_subject(&key);
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(message.payload)
            .expected_stream(target);
        match message.headers.get(async_nats::header::NATS_MESSAGE_ID) {
            Some(id) => publish = publish.message_id(id.as_str()),
            // 0.1 set one on every message; without it a repeated move could store it twice
            // (the client still drops the second copy by the id inside the envelope).
            None => tracing::warn!(
                seq = message.sequence,
                "a message of the previous release's inbox has no Nats-Msg-Id; moved without"
            ),
        }
        match js.send_publish(subject.clone(), publish).await {
            Ok(ack) => pending.push((message.sequence, subject, ack)),
            Err(err) => {
                failures.push((
                    message.sequence,
                    refused(target, message.sequence, &subject, &err),
                ));
                break;
            }
        }
    }
    for (seq, subject, ack) in pending {
        match ack.await {
            Ok(ack) if ack.stream == target => {
                if ack.duplicate {
                    moved.duplicates += 1;
                } else {
                    moved.moved += 1;
                }
                done.push(seq);
            }
            Ok(ack) => {
                failures.push((
                    seq,
                    format!(
                        "moving the previous release's inbox stopped: message {seq} for {subject} \
                         was stored in stream {}, not {target}; it stays in {LEGACY_STREAM} too. \
                         The target's subjects do not match what this server publishes: check \
                         the broker's streams",
                        ack.stream
                    ),
                ));
            }
            Err(err) => failures.push((seq, refused(target, seq, &subject, &err))),
        }
    }
    done.sort_unstable();
    // The first message not moved: every message below it in the old stream is done.
    let (kept, failure) = match failures.into_iter().min_by_key(|(seq, _)| *seq) {
        Some((seq, why)) => (seq, Some(why)),
        None => (end, None),
    };
    if kept > first {
        match legacy.purge().sequence(kept).await {
            Ok(_) => {}
            Err(err) if purge_code(&err) == Some(jetstream::ErrorCode::STREAM_NOT_FOUND) => {
                return Ok(false);
            }
            Err(err) => {
                return Err(failure.unwrap_or_else(|| {
                    format!(
                        "messages {first} to {} of the previous release's inbox were moved, but \
                         could not be removed from {LEGACY_STREAM}: {err}; start the server \
                         again (a message moved twice is stored once)",
                        kept - 1
                    )
                }));
            }
        }
    }
    for seq in done.into_iter().filter(|&seq| seq > kept) {
        match delete_without_erase(js, seq).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            // The move stops anyway (a message after a refused one): the refusal says why.
            Err(err) => {
                tracing::warn!(seq, error = %err, "a moved message stays in {LEGACY_STREAM} too");
            }
        }
    }
    failure.map_or(Ok(true), Err)
}

/// Deletes message `seq` from the old stream without overwriting it on disk (what
/// [`Stream::delete_message`] does, at 15 times the cost); `false` when the stream is gone. A
/// message already gone is deleted.
async fn delete_without_erase(js: &jetstream::Context, seq: u64) -> Result<bool, String> {
    let answer: Result<jetstream::response::Response<serde_json::Value>, _> = js
        .request(
            format!("STREAM.MSG.DELETE.{LEGACY_STREAM}"),
            &serde_json::json!({ "seq": seq, "no_erase": true }),
        )
        .await;
    match answer {
        Ok(jetstream::response::Response::Ok(_)) => Ok(true),
        Ok(jetstream::response::Response::Err { error })
            if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
        {
            Ok(false)
        }
        Ok(jetstream::response::Response::Err { error })
            if ALREADY_DELETED.contains(&error.error_code()) =>
        {
            Ok(true)
        }
        Ok(jetstream::response::Response::Err { error }) => Err(error.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

/// What `STREAM.MSG.DELETE` answers for a message that is not there: nats-server 2.15.1 says
/// "sequence N not found" (10043); "no message found" (10037) and "message delete failed"
/// (10057) are what other versions and code paths use for the same.
const ALREADY_DELETED: [jetstream::ErrorCode; 3] = [
    jetstream::ErrorCode::SEQUENCE_NOT_FOUND,
    jetstream::ErrorCode::NO_MESSAGE_FOUND,
    jetstream::ErrorCode::STREAM_MESSAGE_DELETE_FAILED,
];

/// The operator's sentence for a publish the target did not acknowledge.
fn refused(
    target: &str,
    seq: u64,
    subject: &str,
    err: &jetstream::context::PublishError,
) -> String {
    let what = match err.kind() {
        PublishErrorKind::StreamNotFound => format!(
            "no stream takes {subject}: {target} must exist and hold the current inbox subjects"
        ),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            format!("the broker did not acknowledge it ({err})")
        }
        _ => format!(
            "{target} refused it ({err}). If {target} or the broker's JetStream storage is full, \
             make room first: raise the inbox byte limit (--inbox-max-bytes), raise JetStream's \
             max_file_store, or free disk"
        ),
    };
    format!(
        "moving the previous release's inbox ({LEGACY_STREAM}) to {target} stopped at message \
         {seq} for {subject}: {what}. Nothing is lost: it and every message not yet moved are \
         still in {LEGACY_STREAM}, and the next start of the server goes on with the move"
    )
}

/// The recipient of a message of the old stream: the key its subject `kez.inbox.<key hex>` names.
fn legacy_recipient(subject: &str) -> Option<PublicKey> {
    let hex = subject.strip_prefix(LEGACY_SUBJECT_PREFIX)?;
    if hex.contains('.') {
        return None;
    }
    format!("{}{hex}", kez_core::key::PUBLIC_KEY_PREFIX)
        .parse()
        .ok()
}

/// Whether the old stream is gone, after a step failed: another instance finished the move and
/// deleted it. A deletion in progress answers "stream closed" to other requests while the stream
/// can still be found, so it is asked a few times.
async fn finished_elsewhere(js: &jetstream::Context) -> bool {
    for attempt in 0..GONE_CHECKS {
        if attempt > 0 {
            tokio::time::sleep(GONE_CHECK_PAUSE).await;
        }
        match js.get_stream(LEGACY_STREAM).await {
            Ok(_) => {}
            Err(err) => return stream_not_found(&err),
        }
    }
    false
}

fn stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(source)
        if source.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The JetStream error code of a failed consumer delete, if the broker answered one.
fn consumer_code(err: &jetstream::stream::ConsumerError) -> Option<jetstream::ErrorCode> {
    match err.kind() {
        jetstream::stream::ConsumerErrorKind::JetStream(source) => Some(source.error_code()),
        _ => None,
    }
}

/// The JetStream error code of a failed purge, if the broker answered one.
fn purge_code(err: &jetstream::stream::PurgeError) -> Option<jetstream::ErrorCode> {
    match err.kind() {
        jetstream::stream::PurgeErrorKind::JetStream(source) => Some(source.error_code()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_subject_names_its_recipient_or_nobody() {
        let key = kez_core::SecretKey::generate().public_key();
        let hex = key.to_hex();
        assert_eq!(legacy_recipient(&format!("kez.inbox.{hex}")), Some(key));
        for subject in [
            format!("kez.inbox.{}", hex.to_uppercase()),
            format!("kez.inbox.{}", &hex[1..]),
            format!("kez.inbox.{hex}.{hex}"),
            format!("kez.inbox.{hex}0"),
            format!("kez.mail.{hex}"),
            "kez.inbox.nothex".to_owned(),
            CLOSED_SUBJECT.to_owned(),
        ] {
            assert_eq!(legacy_recipient(&subject), None, "{subject}");
        }
    }
}
