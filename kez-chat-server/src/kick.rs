//! Ending a revoked device's live connections (PROTOCOL.md §6.2).
//!
//! The callout refuses a revoked device's new connections and `kez.mail.*` answers its requests
//! 403 `revoked_device`, but a connection authorized before the revocation would otherwise stay
//! up until its authorization expires (an hour), hearing of new mail on its subject. When the
//! store writes a device's index entry as revoked it hands the key to [`spawn`]'s worker, which,
//! off the append's request path, asks every nats-server of the cluster for that key's
//! connections in account `APP` (`$SYS.REQ.SERVER.PING.CONNZ` filtered by account and user)
//! and has each server close its own (`$SYS.REQ.SERVER.<server id>.KICK` with the `cid`). Both
//! are nats-server's system services (server/events.go, `monSrvc` "CONNZ" and `kickClient`),
//! reachable only from the system account: the server's `SYS` user makes the requests.
//!
//! A device reconnecting meanwhile is refused by the callout, which reads the index entry the
//! store has already written; a connection the callout authorized just before that write but
//! which the broker had not yet registered when the first look came is caught by a second look,
//! [`SECOND_LOOK_AFTER`] later.
//!
//! The same two services end connections whose authorization request went nowhere
//! ([`spawn_missed_sweeper`]): nats-server sends a connection's request to the callout whether
//! or not anyone subscribes, and waits its whole authorization timeout for an answer that
//! cannot come. That is every connection a (re)started broker takes before this instance's
//! `AUTH` connection is back and subscribed, and every one it takes while this instance is
//! down. Each time that connection (re)connects, the sweeper lists the connections still
//! waiting for their account (`$G`, where nats-server keeps them until the callout places them)
//! that are older than the subscription, and closes them: their clients reconnect at once,
//! instead of waiting out the timeout to be refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kez_core::PublicKey;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};

use crate::nats_conf::APP_ACCOUNT;

/// Where every nats-server of a cluster answers with its connections (filtered by the body).
pub const CONNZ_SUBJECT: &str = "$SYS.REQ.SERVER.PING.CONNZ";
/// Most connections of one key each server is asked to list (and so to close) per look: a
/// device has one or two; more are a misbehaving client, whose rest end with their
/// authorization.
pub const MAX_CONNECTIONS_PER_SERVER: usize = 64;
/// How long answers to a CONNZ request are awaited at most.
const ANSWERS_WITHIN: Duration = Duration::from_secs(1);
/// Once one server answered, how long a silence ends the wait: the servers of a cluster answer
/// within milliseconds of each other, and their number is not known here.
const ANSWERS_QUIET: Duration = Duration::from_millis(250);
/// How long one KICK may take to be answered.
const KICK_TIMEOUT: Duration = Duration::from_secs(2);
/// When the second look for the device's connections comes: past nats-server's authorization
/// timeout (`authorization.timeout`, 5 s in the configs `nats_conf` renders, 2 s in older
/// ones), so every connection the callout let in before the index changed is registered by then.
pub const SECOND_LOOK_AFTER: Duration = Duration::from_millis(5500);
/// Revoked keys waiting for the worker; past that a revocation is logged and its connections
/// end with their authorization.
const QUEUE: usize = 1024;
/// Revoked keys handled at once.
const PARALLEL: usize = 16;
/// KICKs under way at once: each is a round trip through a broker that may be busy (a storm).
const KICKS_AT_ONCE: usize = 64;
/// The account nats-server keeps a client connection in until the callout has placed it (its
/// global account; no user is placed there, so the connections in it are the waiting ones).
pub const WAITING_ACCOUNT: &str = "$G";
/// Most waiting connections of one server a sweep lists (and so closes). A restarted broker
/// takes a few per millisecond before the callout is back; more are left to the timeout.
pub const MAX_MISSED_PER_SERVER: usize = 1024;
/// How long a sweep lets the connections it took for missed wait before it closes those still
/// waiting: a busy broker reads some clients' CONNECT only after the callout subscribed, and
/// the callout places those within this, as it answers. Well within the authorization
/// timeout (5 s) the missed ones would otherwise wait out.
const RECHECK_AFTER: Duration = Duration::from_secs(1);
/// How long a sweep waits for the system connection, itself reconnecting after an outage.
const SYSTEM_BACK_WITHIN: Duration = Duration::from_secs(2);

/// One nats-server's answer to a CONNZ request (`ServerAPIConnzResponse`): which server, and
/// the connections it lists, or its error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnzAnswer {
    /// The answering server's id (`N...`), the token of its KICK subject.
    pub server_id: String,
    /// The `cid` of every connection it listed.
    pub cids: Vec<u64>,
}

#[derive(Deserialize)]
struct ApiResponse<T> {
    server: ServerInfo,
    data: Option<T>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ServerInfo {
    id: String,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct Connz {
    /// When the server made the list, by its clock (RFC 3339).
    #[serde(default)]
    now: Option<String>,
    #[serde(default)]
    connections: Vec<ConnInfo>,
}

#[derive(Deserialize)]
struct ConnInfo {
    cid: u64,
    /// When the server took the connection, by its clock (RFC 3339).
    #[serde(default)]
    start: Option<String>,
    /// The client library's language, from its `CONNECT`: empty until the server has read it.
    #[serde(default)]
    lang: String,
}

/// The CONNZ request body for the connections of `key` in `APP` (`ConnzEventOptions`: `acc`
/// and `user` filter, `limit` bounds the list). The callout names each user by its key's nkey,
/// which is what nats-server matches `user` against.
pub fn connz_request(key: &PublicKey) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "acc": APP_ACCOUNT,
        "user": key.to_nkey(),
        "limit": MAX_CONNECTIONS_PER_SERVER,
    }))
    .expect("a JSON object serialises")
}

/// The CONNZ request body for the connections waiting for the callout (account
/// [`WAITING_ACCOUNT`]), oldest first.
pub fn waiting_connz_request() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "acc": WAITING_ACCOUNT,
        "sort": "start",
        "limit": MAX_MISSED_PER_SERVER,
    }))
    .expect("a JSON object serialises")
}

/// Reads one server's answer to [`connz_request`].
pub fn parse_connz(body: &[u8]) -> Result<ConnzAnswer, String> {
    let (server_id, connz) = read_connz(body)?;
    let cids = connz
        .map(|connz| connz.connections.into_iter().map(|conn| conn.cid).collect())
        .unwrap_or_default();
    Ok(ConnzAnswer { server_id, cids })
}

/// Reads one server's answer to [`waiting_connz_request`] sent `subscribed_for` after the
/// callout subscribed (after the round trip that confirmed it began: the subscription went
/// out just before it): the connections the server took before then (older, by the server's
/// own clock, than `subscribed_for`) and whose `CONNECT` it has read (it names the client's
/// `lang`), whose requests went out before anyone subscribed. Taken too, and reconnecting: the
/// connections taken in the moment the CONNZ request takes to arrive, and those taken before
/// the subscription whose `CONNECT` the server read only after it (a busy broker reads a
/// client's first bytes late), whose requests did come. (A margin the other way would leave
/// the last connections taken before the subscription, which are many in a storm.)
pub fn parse_missed(body: &[u8], subscribed_for: Duration) -> Result<ConnzAnswer, String> {
    let (server_id, connz) = read_connz(body)?;
    let Some(connz) = connz else {
        return Ok(ConnzAnswer {
            server_id,
            cids: Vec::new(),
        });
    };
    let time = |text: Option<&String>, what: &str| {
        text.and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .ok_or_else(|| format!("server {server_id}'s CONNZ answer has no readable {what}"))
    };
    let now = time(connz.now.as_ref(), "now")?;
    let older_than = chrono::Duration::from_std(subscribed_for)
        .map_err(|err| format!("a sweep after {subscribed_for:?}: {err}"))?;
    let mut cids = Vec::new();
    for conn in &connz.connections {
        // A connection whose CONNECT the server has not read yet has no request out: it
        // reaches the callout when it comes.
        if !conn.lang.is_empty() && now - time(conn.start.as_ref(), "start")? > older_than {
            cids.push(conn.cid);
        }
    }
    Ok(ConnzAnswer { server_id, cids })
}

/// The connections of `first` that `second` lists too, server by server.
pub fn still_waiting(first: &[ConnzAnswer], second: &[ConnzAnswer]) -> Vec<ConnzAnswer> {
    first
        .iter()
        .map(|answer| {
            let now: std::collections::HashSet<u64> = second
                .iter()
                .filter(|later| later.server_id == answer.server_id)
                .flat_map(|later| later.cids.iter().copied())
                .collect();
            ConnzAnswer {
                server_id: answer.server_id.clone(),
                cids: answer
                    .cids
                    .iter()
                    .copied()
                    .filter(|cid| now.contains(cid))
                    .collect(),
            }
        })
        .collect()
}

/// One server's id and list, or its error.
fn read_connz(body: &[u8]) -> Result<(String, Option<Connz>), String> {
    let answer: ApiResponse<Connz> =
        serde_json::from_slice(body).map_err(|err| format!("unreadable CONNZ answer: {err}"))?;
    let server_id = checked_server_id(answer.server.id)?;
    if let Some(error) = answer.error {
        return Err(format!(
            "server {server_id} refused the CONNZ request: {} {}",
            error.code, error.description
        ));
    }
    Ok((server_id, answer.data))
}

/// The KICK request body for connection `cid` (`KickClientReq`).
pub fn kick_request(cid: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "cid": cid })).expect("a JSON object serialises")
}

/// The subject on which server `server_id` closes a connection of its own.
pub fn kick_subject(server_id: &str) -> String {
    format!("$SYS.REQ.SERVER.{server_id}.KICK")
}

/// What a KICK did, from the server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// The connection is closed.
    Closed,
    /// There was no such connection any more (it had ended meanwhile).
    Gone,
}

/// Reads a server's answer to [`kick_request`].
pub fn parse_kick(body: &[u8]) -> Result<Kicked, String> {
    let answer: ApiResponse<serde::de::IgnoredAny> =
        serde_json::from_slice(body).map_err(|err| format!("unreadable KICK answer: {err}"))?;
    match answer.error {
        None => Ok(Kicked::Closed),
        // nats-server's DisconnectClientByID, for a cid it does not hold.
        Some(error) if error.description.contains("no such client") => Ok(Kicked::Gone),
        Some(error) => Err(format!(
            "server {} refused the KICK: {} {}",
            answer.server.id, error.code, error.description
        )),
    }
}

/// A server id goes into a subject: only the characters nats-server's ids (`N...`, base32)
/// have.
fn checked_server_id(id: String) -> Result<String, String> {
    if !id.is_empty() && id.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
        Ok(id)
    } else {
        Err(format!("a CONNZ answer names the server {id:?}"))
    }
}

/// Closes connections through the server's `SYS` connection.
#[derive(Clone)]
pub struct Kicker {
    client: async_nats::Client,
}

impl Kicker {
    /// A kicker over `client`, a connection as a user of nats-server's system account.
    pub fn new(client: async_nats::Client) -> Kicker {
        Kicker { client }
    }

    /// Whether nats-server answers this connection's CONNZ requests, asked once at start: a
    /// connection the broker did not place in its system account (say an older instance's
    /// callout let the key in as a user) gets no answer. One request, answered by the first
    /// server within [`KICK_TIMEOUT`], about a user that does not exist.
    pub async fn check(&self) -> Result<(), String> {
        let probe = serde_json::json!({ "acc": APP_ACCOUNT, "user": "-", "limit": 1 });
        let answer = tokio::time::timeout(
            KICK_TIMEOUT,
            self.client.request(CONNZ_SUBJECT, probe.to_string().into()),
        )
        .await
        .map_err(|_| format!("no answer to {CONNZ_SUBJECT} within {KICK_TIMEOUT:?}"))?
        .map_err(|err| format!("{CONNZ_SUBJECT}: {err}"))?;
        parse_connz(&answer.payload).map(drop)
    }

    /// Closes every connection of `key` in `APP` on every server that answers; how many it
    /// closed. Bounded: one CONNZ round of at most [`ANSWERS_WITHIN`], then at most
    /// [`MAX_CONNECTIONS_PER_SERVER`] KICKs per answering server, each within [`KICK_TIMEOUT`].
    pub async fn kick(&self, key: &PublicKey) -> Result<usize, String> {
        let answers = self.connections(connz_request(key), parse_connz).await?;
        self.kick_all(&answers).await
    }

    /// Closes every connection each server took before the callout's subscription (made
    /// `subscribed` ago) that still waits for its authorization [`RECHECK_AFTER`] later: nats-server sent their
    /// requests to no one ([`parse_missed`]). Answers how many it closed. Bounded like
    /// [`Kicker::kick`], with [`MAX_MISSED_PER_SERVER`] per server.
    pub async fn end_missed(&self, subscribed: Instant) -> Result<usize, String> {
        // Measured as the request leaves: the answer may wait long behind the broker's own
        // messages to this connection, while the server's `now` is when it made the list.
        let subscribed_for = subscribed.elapsed();
        let taken_before = self
            .connections(waiting_connz_request(), |body| {
                parse_missed(body, subscribed_for)
            })
            .await?;
        if taken_before.iter().all(|answer| answer.cids.is_empty()) {
            return Ok(0);
        }
        // Those whose requests did come (read after the subscription) are placed meanwhile.
        tokio::time::sleep(RECHECK_AFTER).await;
        let waiting = self
            .connections(waiting_connz_request(), parse_connz)
            .await?;
        let answers = still_waiting(&taken_before, &waiting);
        for answer in answers.iter().filter(|answer| !answer.cids.is_empty()) {
            tracing::info!(server = answer.server_id, cids = ?answer.cids, "closing connections that wait for an authorization request the broker sent before the callout had subscribed");
        }
        self.kick_all(&answers).await
    }

    /// KICKs every connection `answers` lists, [`KICKS_AT_ONCE`] at a time.
    async fn kick_all(&self, answers: &[ConnzAnswer]) -> Result<usize, String> {
        let targets: Vec<(String, u64)> = answers
            .iter()
            .flat_map(|answer| {
                let server_id = answer.server_id.clone();
                answer.cids.iter().map(move |&cid| (server_id.clone(), cid))
            })
            .collect();
        let results: Vec<Result<Kicked, String>> = futures::stream::iter(targets)
            .map(|(server_id, cid)| async move { self.kick_one(&server_id, cid).await })
            .buffer_unordered(KICKS_AT_ONCE)
            .collect()
            .await;
        let closed = results
            .iter()
            .filter(|result| matches!(result, Ok(Kicked::Closed)))
            .count();
        let failures: Vec<&String> = results
            .iter()
            .filter_map(|result| result.as_ref().err())
            .collect();
        match failures.first() {
            None => Ok(closed),
            Some(first) => Err(format!(
                "closed {closed}, {} KICKs failed, the first: {first}",
                failures.len()
            )),
        }
    }

    /// Every server's answer to the CONNZ request `request`, read by `parse` ([`every_server`]).
    async fn connections(
        &self,
        request: Vec<u8>,
        parse: impl Fn(&[u8]) -> Result<ConnzAnswer, String>,
    ) -> Result<Vec<ConnzAnswer>, String> {
        every_server(&self.client, CONNZ_SUBJECT, request, parse).await
    }

    async fn kick_one(&self, server_id: &str, cid: u64) -> Result<Kicked, String> {
        let answer = tokio::time::timeout(
            KICK_TIMEOUT,
            self.client
                .request(kick_subject(server_id), kick_request(cid).into()),
        )
        .await
        .map_err(|_| format!("server {server_id} did not answer the KICK of {cid}"))?
        .map_err(|err| format!("the KICK of {cid} on server {server_id}: {err}"))?;
        parse_kick(&answer.payload)
    }
}

/// Starts the worker that kicks each revoked key sent on the returned sender (twice: at once
/// and [`SECOND_LOOK_AFTER`] later), at most [`PARALLEL`] keys at a time. The worker ends when
/// every sender is dropped.
pub fn spawn(kicker: Kicker) -> (mpsc::Sender<PublicKey>, tokio::task::JoinHandle<()>) {
    let (revoked, received) = mpsc::channel(QUEUE);
    let keys = futures::stream::unfold(received, |mut received| async move {
        received.recv().await.map(|key| (key, received))
    });
    let worker = tokio::spawn(keys.for_each_concurrent(PARALLEL, move |key| {
        let kicker = kicker.clone();
        async move {
            let started = std::time::Instant::now();
            match kicker.kick(&key).await {
                Ok(0) => tracing::debug!(device = %key, "a revoked device had no open connection"),
                Ok(closed) => tracing::info!(device = %key, closed, took = ?started.elapsed(), "closed a revoked device's connections"),
                Err(err) => tracing::warn!(device = %key, error = %err, "cannot close a revoked device's connections; they end when their authorization expires (at most an hour)"),
            }
            tokio::time::sleep(SECOND_LOOK_AFTER).await;
            match kicker.kick(&key).await {
                Ok(0) => {}
                Ok(closed) => tracing::info!(device = %key, closed, "closed a revoked device's connections at the second look"),
                Err(err) => tracing::warn!(device = %key, error = %err, "second look at a revoked device's connections failed"),
            }
        }
    }));
    (revoked, worker)
}

/// Starts the sweeper: each time `reconnected` is notified (the callout's `AUTH` connection
/// `auth` connected), it waits until the broker has confirmed `auth`'s subscriptions, then
/// closes the connections whose requests went nowhere meanwhile ([`Kicker::end_missed`]).
pub fn spawn_missed_sweeper(
    kicker: Kicker,
    auth: async_nats::Client,
    reconnected: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            reconnected.notified().await;
            // A round trip after the subscriptions, which a reconnect sends first. The time it
            // began stands for the subscription's: its answer may come late, behind the
            // requests the broker already sends this connection.
            let subscribed = Instant::now();
            if let Err(err) = auth.flush().await {
                tracing::debug!(error = %err, "the callout's connection is down again; sweeping at its next connect");
                continue;
            }
            // The system connection comes back from the same outage on its own.
            let system_back = tokio::time::timeout(SYSTEM_BACK_WITHIN, kicker.client.flush()).await;
            if !matches!(system_back, Ok(Ok(()))) {
                tracing::warn!(wait = ?SYSTEM_BACK_WITHIN, "the system connection is not back; connections the broker took before the callout subscribed wait out their authorization timeout");
                continue;
            }
            match kicker.end_missed(subscribed).await {
                Ok(0) => tracing::debug!(
                    "no connection waits for an authorization request that went nowhere"
                ),
                Ok(closed) => tracing::info!(closed, "closed them; their clients reconnect"),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot close the connections the broker took before the callout subscribed; they wait out their authorization timeout")
                }
            }
        }
    })
}

/// Every nats-server's answer to `request` on `subject` (one of the system account's
/// `$SYS.REQ.SERVER.PING.*` services), sent over `client` (a system account user) and read by
/// `parse`: all answers that come within [`ANSWERS_WITHIN`], the wait ending early after a
/// silence of [`ANSWERS_QUIET`]. An answer `parse` refuses is logged and left out; none at all
/// is an error.
pub(crate) async fn every_server<T>(
    client: &async_nats::Client,
    subject: &str,
    request: Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|err| format!("cannot subscribe for the answers to {subject}: {err}"))?;
    client
        .publish_with_reply(subject.to_owned(), inbox, request.into())
        .await
        .map_err(|err| format!("cannot send the {subject} request: {err}"))?;
    let deadline = tokio::time::Instant::now() + ANSWERS_WITHIN;
    let mut answers = Vec::new();
    loop {
        let wait = match answers.is_empty() {
            true => deadline,
            false => deadline.min(tokio::time::Instant::now() + ANSWERS_QUIET),
        };
        match tokio::time::timeout_at(wait, replies.next()).await {
            Ok(Some(message)) => match parse(&message.payload) {
                Ok(answer) => answers.push(answer),
                Err(err) => tracing::warn!(subject, error = %err, "an answer is of no use"),
            },
            Ok(None) | Err(_) => break,
        }
    }
    if answers.is_empty() {
        return Err(format!(
            "no nats-server answered {subject} within {ANSWERS_WITHIN:?}: is the server's system user in nats-server's SYS account, allowed to publish it?"
        ));
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from nats-server 2.15.1 (the test broker of tests/tests/devices.rs):
    /// `$SYS.REQ.SERVER.PING.CONNZ` with `{"acc":"APP","user":"U...","limit":64}` for a user
    /// with one connection.
    const CONNZ_ANSWER: &str = r#"{"server":{"name":"kez-test","host":"127.0.0.1","id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","ver":"2.15.1","feature_flags":{"js_ack_fc_v2":false,"js_api_reply_v2":false,"js_raft_delete_range":true,"js_snapshot_sources":false},"jetstream":true,"flags":7,"seq":80,"time":"2026-12-06T01:00:04.140440728Z"},"data":{"server_id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","now":"2026-12-06T01:00:04.140429041Z","num_connections":1,"total":1,"offset":0,"limit":64,"connections":[{"cid":36,"kind":"Client","type":"nats","ip":"127.0.0.1","port":42894,"start":"2026-12-06T01:00:04.128249462Z","last_activity":"2026-12-06T01:00:04.13790827Z","rtt":"375µs","uptime":"0s","idle":"0s","pending_bytes":0,"in_msgs":1,"out_msgs":1,"in_bytes":443,"out_bytes":83,"subscriptions":1,"lang":"rust","version":"0.51.0"}]}}"#;
    /// Captured likewise, for a key without a connection.
    const CONNZ_EMPTY: &str = r#"{"server":{"name":"kez-test","host":"127.0.0.1","id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","ver":"2.15.1","feature_flags":{"js_ack_fc_v2":false,"js_api_reply_v2":false,"js_raft_delete_range":true,"js_snapshot_sources":false},"jetstream":true,"flags":7,"seq":86,"time":"2026-12-06T01:00:04.142302678Z"},"data":{"server_id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","now":"2026-12-06T01:00:04.14229752Z","num_connections":0,"total":0,"offset":0,"limit":64,"connections":[]}}"#;
    /// Captured likewise: `$SYS.REQ.SERVER.<id>.KICK` with `{"cid":36}`, then the same again.
    const KICK_DONE: &str = r#"{"server":{"name":"kez-test","host":"127.0.0.1","id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","ver":"2.15.1","feature_flags":{"js_ack_fc_v2":false,"js_api_reply_v2":false,"js_raft_delete_range":true,"js_snapshot_sources":false},"jetstream":true,"flags":7,"seq":83,"time":"2026-12-06T01:00:04.141021441Z"}}"#;
    const KICK_GONE: &str = r#"{"server":{"name":"kez-test","host":"127.0.0.1","id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","ver":"2.15.1","feature_flags":{"js_ack_fc_v2":false,"js_api_reply_v2":false,"js_raft_delete_range":true,"js_snapshot_sources":false},"jetstream":true,"flags":7,"seq":85,"time":"2026-12-06T01:00:04.141458762Z"},"error":{"code":500,"description":"no such client or leafnode id"}}"#;

    /// Shaped as nats-server 2.15.1 answers `{"acc":"$G","sort":"start","limit":1024}`: three
    /// connections waiting for the callout, taken 900 ms and 100 ms before the list was made
    /// (their CONNECTs read), and one taken a second before whose CONNECT was not read yet.
    const CONNZ_WAITING: &str = r#"{"server":{"name":"kez-test","host":"127.0.0.1","id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","ver":"2.15.1","jetstream":true,"flags":7,"seq":12,"time":"2026-12-06T01:00:05.000000000Z"},"data":{"server_id":"NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN","now":"2026-12-06T01:00:05.000000000Z","num_connections":3,"total":3,"offset":0,"limit":1024,"connections":[{"cid":4,"kind":"Client","type":"nats","ip":"127.0.0.1","port":42894,"start":"2026-12-06T01:00:04.1Z","last_activity":"2026-12-06T01:00:04.1Z","rtt":"0s","uptime":"0s","idle":"0s","pending_bytes":0,"in_msgs":0,"out_msgs":0,"in_bytes":0,"out_bytes":0,"subscriptions":0,"lang":"rust","version":"0.51.0"},{"cid":9,"kind":"Client","type":"nats","ip":"127.0.0.1","port":42896,"start":"2026-12-06T01:00:04.9Z","last_activity":"2026-12-06T01:00:04.9Z","rtt":"0s","uptime":"0s","idle":"0s","pending_bytes":0,"in_msgs":0,"out_msgs":0,"in_bytes":0,"out_bytes":0,"subscriptions":0,"lang":"rust","version":"0.51.0"},{"cid":11,"kind":"Client","type":"nats","ip":"127.0.0.1","port":42898,"start":"2026-12-06T01:00:04.0Z","last_activity":"2026-12-06T01:00:04.0Z","rtt":"0s","uptime":"0s","idle":"0s","pending_bytes":0,"in_msgs":0,"out_msgs":0,"in_bytes":0,"out_bytes":0,"subscriptions":0}]}}"#;

    #[test]
    fn only_connections_older_than_the_subscription_are_taken_for_missed() {
        let missed = |after_ms| {
            parse_missed(CONNZ_WAITING.as_bytes(), Duration::from_millis(after_ms))
                .unwrap()
                .cids
        };
        // Subscribed 50 ms before the list: both were taken before it; 11 has no request out.
        assert_eq!(missed(50), vec![4, 9]);
        // 500 ms before: the one taken 100 ms before the list came after the subscription.
        assert_eq!(missed(500), vec![4]);
        assert_eq!(missed(1000), Vec::<u64>::new());
        // No times to go by: nothing is taken.
        let undated = CONNZ_WAITING.replace("\"start\"", "\"begun\"");
        assert!(parse_missed(undated.as_bytes(), Duration::ZERO).is_err());
        assert_eq!(
            waiting_connz_request(),
            br#"{"acc":"$G","limit":1024,"sort":"start"}"#
        );
        // A list of none, as a server with no waiting connection answers.
        assert_eq!(
            parse_missed(CONNZ_EMPTY.as_bytes(), Duration::ZERO)
                .unwrap()
                .cids,
            Vec::<u64>::new()
        );
    }

    #[test]
    fn only_connections_in_both_lists_of_the_same_server_are_still_waiting() {
        let answer = |server_id: &str, cids: &[u64]| ConnzAnswer {
            server_id: server_id.into(),
            cids: cids.to_vec(),
        };
        assert_eq!(
            still_waiting(
                &[answer("NA", &[1, 2, 3]), answer("NB", &[4])],
                &[answer("NA", &[2, 3, 9]), answer("NC", &[4])],
            ),
            vec![answer("NA", &[2, 3]), answer("NB", &[])]
        );
    }

    #[test]
    fn reads_captured_connz_and_kick_answers() {
        assert_eq!(
            parse_connz(CONNZ_ANSWER.as_bytes()).unwrap(),
            ConnzAnswer {
                server_id: "NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN".into(),
                cids: vec![36],
            }
        );
        assert_eq!(
            parse_connz(CONNZ_EMPTY.as_bytes()).unwrap().cids,
            Vec::<u64>::new()
        );
        assert_eq!(parse_kick(KICK_DONE.as_bytes()), Ok(Kicked::Closed));
        assert_eq!(parse_kick(KICK_GONE.as_bytes()), Ok(Kicked::Gone));
        assert_eq!(
            kick_subject("NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN"),
            "$SYS.REQ.SERVER.NCKOAS3QBEFLFYRQXU2KIV3RX6C6A74JGQSPCMOBIHLIWKZQLGH5OWSN.KICK"
        );
        assert_eq!(kick_request(36), br#"{"cid":36}"#);
    }

    #[test]
    fn refuses_errors_and_odd_server_ids() {
        let refused = r#"{"server":{"id":"NABC"},"error":{"code":400,"description":"bad"}}"#;
        assert!(
            parse_connz(refused.as_bytes())
                .unwrap_err()
                .contains("400 bad")
        );
        let odd = r#"{"server":{"id":"N.>"},"data":{"connections":[{"cid":1}]}}"#;
        assert!(parse_connz(odd.as_bytes()).is_err());
        let other = r#"{"server":{"id":"NABC"},"error":{"code":500,"description":"boom"}}"#;
        assert!(parse_kick(other.as_bytes()).is_err());
        assert!(parse_connz(b"not json").is_err());
    }

    #[test]
    fn the_connz_request_filters_by_account_and_user() {
        let key = kez_core::SecretKey::generate().public_key();
        let request: serde_json::Value = serde_json::from_slice(&connz_request(&key)).unwrap();
        assert_eq!(
            request,
            serde_json::json!({"acc": "APP", "user": key.to_nkey(), "limit": 64})
        );
    }
}
