//! Delivery under faults (issue 11, item 2). Four users on the kez-client library send to each
//! other while the test kills nats-server (SIGKILL; restarted on the same port with the same
//! file store, `sync_interval: always` as the supplied configs have), kills kez-chat-server
//! instances (one, the other, both; they answer the auth callout and `kez.mail.fetch`, so
//! receiving clients need them) and starts new ones, and kills receiving clients in the middle
//! of receiving: once after a fetch was answered and before anything was stored, once after a
//! batch was stored and before the next fetch acknowledged it. At the end every message whose
//! send was acknowledged must have been shown exactly once to its recipient, decrypted and
//! verified, nothing else shown, and nothing left behind: after one more fetch, which
//! acknowledges the last batch, every user's inbox subject in `KEZ_MAIL` is empty.
//!
//! Forward secrecy is on (every user prepares it, as the service does): every message is
//! envelope version 2, and the kills fall between decrypting, storing with the sessions and
//! the floor moving; at the end no message may be undecryptable.
//!
//! `make test` runs a short form (about 12 s of traffic, then a drain of a few seconds).
//! `KEZ_SOAK_SECS=N` (`make soak`) runs N seconds of traffic, repeating the fault schedule.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use kez_client::store::Received;
use kez_client::{Connection, Contact, ForwardSecrecy, InboxFloor, UNDECRYPTABLE_CONTENT_TYPE};
use kez_core::envelope;
use kez_proto::Endpoint;
use kez_proto::mail::{FetchAnswer, FetchRequest};
use kez_proto::subjects::MAIL_STREAM;
use kez_tests::NatsServer;
use kez_tests::callout::server_client;
use kez_tests::chat::{ChatUser, Ledger, inbox_held};
use kez_tests::process::KezServerProcess;
use tempfile::TempDir;

/// Users; each sends to the next two.
const NAMES: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// Traffic in the short form.
const SHORT_SECS: u64 = 12;
/// The fault schedule repeats with this period (the soak form runs it again and again).
const CYCLE: Duration = Duration::from_secs(12);
/// Pause between one sender's messages.
const SEND_PACE: Duration = Duration::from_millis(30);
/// How long setup steps and recoveries may take.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long the drain may take after the traffic: recovery from the last fault (a broker
/// kill, and every client's reconnect through the callout). Nothing waits out an ack wait:
/// what a killed client left unacknowledged is fetched again by its next fetch.
const DRAIN: Duration = Duration::from_secs(60);

/// How a receiving client dies.
#[derive(Debug, Clone, Copy)]
enum ClientCrash {
    /// Its fetch was answered and it died before opening the batch: nothing stored, nothing
    /// acknowledged; its next fetch gets the batch again.
    AfterFetch,
    /// It fetched, opened and stored a batch (with its inbox floor, in one transaction) and
    /// died before its next fetch acknowledged it: that fetch, on the next connection,
    /// acknowledges the batch by naming the floor and gets only what came after.
    AfterStore,
}

/// A fault the main task injects, at an offset into each cycle.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Every receiver dies this way (each at its next turn).
    Clients(ClientCrash),
    /// kez-chat-server instance 0 or 1 is killed (SIGKILL) and a new one started.
    Server(usize),
    /// Both instances are killed, then two new ones started.
    BothServers,
    /// nats-server is killed (SIGKILL) and restarted on its port and store.
    Broker,
}

/// Offsets into a cycle.
const SCHEDULE: &[(u64, Fault)] = &[
    (1_000, Fault::Clients(ClientCrash::AfterFetch)),
    (2_500, Fault::Clients(ClientCrash::AfterStore)),
    (3_500, Fault::Server(0)),
    (5_000, Fault::Broker),
    (7_000, Fault::Server(1)),
    (8_500, Fault::BothServers),
    (10_500, Fault::Broker),
];

/// The broker, its keys and the kez-chat-server instances.
struct Stack {
    nats: NatsServer,
    keys_dir: TempDir,
    issuer: String,
    servers: [Option<KezServerProcess>; 2],
}

impl Stack {
    async fn spawn_server(&self) -> KezServerProcess {
        KezServerProcess::spawn_with_callout(&self.nats.url(), self.keys_dir.path(), &self.issuer)
            .await
    }

    async fn inject(&mut self, fault: Fault, crashes: &[Arc<std::sync::Mutex<Vec<ClientCrash>>>]) {
        match fault {
            Fault::Clients(crash) => {
                for pending in crashes {
                    pending.lock().unwrap().push(crash);
                }
            }
            Fault::Server(i) => {
                if let Some(mut server) = self.servers[i].take() {
                    server.kill();
                }
                self.servers[i] = Some(self.spawn_server().await);
            }
            Fault::BothServers => {
                for i in 0..2 {
                    if let Some(mut server) = self.servers[i].take() {
                        server.kill();
                    }
                }
                for i in 0..2 {
                    self.servers[i] = Some(self.spawn_server().await);
                }
            }
            Fault::Broker => self.nats.kill_and_restart(),
        }
    }
}

/// Sends to `contacts` in turn until `stop`, each message with a unique body; a failed send is
/// counted and the next message tried after a pause (as a person would send again).
async fn sender(
    ledger: Ledger,
    name: &'static str,
    conn: Connection,
    contacts: Vec<Contact>,
    stop: Arc<AtomicBool>,
) {
    let me = conn.public_key();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let to = &contacts[n % contacts.len()];
        let body = format!("{name} to {} #{n}", to.handle);
        n += 1;
        ledger.attempt(me, to.key, body.as_bytes());
        match tokio::time::timeout(PATIENCE, conn.send(to, "text", body.as_bytes())).await {
            Ok(Ok(sent)) => {
                ledger.acked(&sent);
                tokio::time::sleep(SEND_PACE).await;
            }
            _ => {
                ledger.send_failed();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Simulates a client process that dies in the middle of receiving: fetches a batch after its
/// stored inbox floor as [`Connection::receive`] does, stores what opens together with the
/// new floor (for [`ClientCrash::AfterStore`]), and drops the connection without fetching
/// again, so nothing is acknowledged. Returns whether it fetched anything (a crash with
/// nothing in hand tests nothing).
async fn crash_while_receiving(
    ledger: &Ledger,
    user: &ChatUser,
    conn: Connection,
    crash: ClientCrash,
) -> bool {
    let me = conn.public_key();
    let floor = user.store.inbox_floor().unwrap();
    let request = FetchRequest {
        after: floor.seq,
        max: 20,
        time: floor.time,
        origins: false,
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        conn.nats().request(
            Endpoint::MailFetch.subject(),
            serde_json::to_vec(&request).unwrap().into(),
        ),
    )
    .await;
    // Dropped without draining, like a killed process's socket.
    drop(conn);
    let body = match answer {
        Ok(Ok(answer))
            if answer
                .headers
                .as_ref()
                .is_none_or(|headers| headers.get("Nats-Service-Error-Code").is_none()) =>
        {
            answer.payload
        }
        // No answer or an error answer (a server or the broker is down): nothing in hand.
        _ => return false,
    };
    let fetched = FetchAnswer::decode(&body, false).expect("a fetch answer");
    let Some(last) = fetched.messages.last() else {
        return false;
    };
    if let ClientCrash::AfterStore = crash {
        // Opened, decrypted and stored with the sessions and the floor in one transaction,
        // as the library does; then the process dies before the next fetch.
        let batch: Vec<_> = fetched
            .messages
            .iter()
            .filter_map(|message| {
                let received = match envelope::open_outer(&user.key, message.envelope).ok()? {
                    envelope::Opened::Sealed(message) => Received::Sealed(message),
                    envelope::Opened::Olm(outer) => Received::Olm(outer),
                };
                Some((received, message.seq, None))
            })
            .collect();
        let floor = InboxFloor {
            seq: last.seq,
            time: last.time,
        };
        let recorded = user
            .store
            .record_fetched_olm(&user.key, batch, &[], floor, kez_client::now())
            .unwrap();
        assert!(
            recorded.undecryptable.is_empty(),
            "nothing undecryptable: {:?}",
            recorded.undecryptable
        );
        // Stored, so shown: the CLI shows stored, unshown messages on its next run.
        ledger.shown(me, &recorded.fresh);
    }
    true
}

/// Receives into `user`'s store until `stop`; dies (and comes back with a new connection)
/// when `crashes` asks it to.
async fn receiver(
    ledger: Ledger,
    user: Arc<ChatUser>,
    url: String,
    crashes: Arc<std::sync::Mutex<Vec<ClientCrash>>>,
    traffic_over: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let me = user.key.public_key();
    let mut conn = user.connect(&url, PATIENCE).await;
    while !stop.load(Ordering::SeqCst) {
        let crash = crashes.lock().unwrap().first().copied();
        if let Some(crash) = crash {
            if crash_while_receiving(&ledger, &user, conn, crash).await {
                crashes.lock().unwrap().remove(0);
                ledger.fault();
            } else if traffic_over.load(Ordering::SeqCst) {
                // Nothing in hand and nothing more coming: this crash cannot happen.
                crashes.lock().unwrap().remove(0);
            }
            conn = user.connect(&url, PATIENCE).await;
            continue;
        }
        ledger.operation();
        match conn
            .receive(&user.store, 100, Duration::from_millis(500))
            .await
        {
            Ok(messages) => ledger.shown(me, &messages),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Messages the inbox stream holds (undelivered or unacknowledged), or `None` if JetStream
/// does not answer.
async fn in_stream(js: &jetstream::Context) -> Option<u64> {
    let mut stream = js.get_stream(MAIL_STREAM).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_is_shown_exactly_once_through_faults() {
    let soak_secs = std::env::var("KEZ_SOAK_SECS").ok().map(|secs| {
        secs.parse::<u64>()
            .expect("KEZ_SOAK_SECS is a number of seconds")
    });
    let traffic = Duration::from_secs(soak_secs.unwrap_or(SHORT_SECS));
    let started = Instant::now();

    let keys_dir = tempfile::Builder::new()
        .prefix("kez-keys-")
        .tempdir()
        .unwrap();
    let keys = kez_chat_server::nats_conf::keygen(keys_dir.path())
        .unwrap()
        .0;
    let nats = NatsServer::start_durable(&kez_chat_server::nats_conf::render_auth(&keys));
    let mut stack = Stack {
        nats,
        keys_dir,
        issuer: keys.issuer.clone(),
        servers: [None, None],
    };
    stack.servers[0] = Some(stack.spawn_server().await);
    stack.servers[1] = Some(stack.spawn_server().await);
    let url = stack.nats.url();

    let mut users = Vec::new();
    for name in NAMES {
        users.push(Arc::new(ChatUser::register(&url, name, PATIENCE).await));
    }
    let ledger = Ledger::default();
    let stop_sending = Arc::new(AtomicBool::new(false));
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut crashes = Vec::new();
    // Forward secrecy on (the service's default): each publishes prekeys and binds its Olm
    // key before anyone verifies anyone, so every message is envelope version 2.
    let mut conns = Vec::new();
    for user in &users {
        let conn = user.connect(&url, PATIENCE).await;
        assert_eq!(
            conn.prepare_forward_secrecy(&user.store).await.unwrap(),
            ForwardSecrecy::Ready
        );
        conns.push(conn);
    }
    for (i, (user, conn)) in users.iter().zip(conns).enumerate() {
        let mut contacts = Vec::new();
        for step in 1..=2 {
            let other = NAMES[(i + step) % NAMES.len()];
            contacts.push(user.add(&conn, other, PATIENCE).await);
        }
        senders.push(tokio::spawn(sender(
            ledger.clone(),
            NAMES[i],
            conn,
            contacts,
            stop_sending.clone(),
        )));
        let pending = Arc::new(std::sync::Mutex::new(Vec::new()));
        crashes.push(pending.clone());
        receivers.push(tokio::spawn(receiver(
            ledger.clone(),
            user.clone(),
            url.clone(),
            pending,
            stop_sending.clone(),
            stop_receiving.clone(),
        )));
    }
    eprintln!("{:?}: four users chatting", started.elapsed());

    // The faults, cycle after cycle, while the traffic lasts.
    let traffic_start = Instant::now();
    'cycles: for cycle in 0.. {
        for (offset, fault) in SCHEDULE {
            let at = traffic_start + CYCLE * cycle + Duration::from_millis(*offset);
            if at >= traffic_start + traffic {
                break 'cycles;
            }
            tokio::time::sleep_until(at.into()).await;
            stack.inject(*fault, &crashes).await;
            if !matches!(fault, Fault::Clients(_)) {
                ledger.fault();
            }
            eprintln!("{:?}: {fault:?}", started.elapsed());
        }
    }
    tokio::time::sleep_until((traffic_start + traffic).into()).await;
    stop_sending.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.expect("a sender panicked");
    }
    eprintln!("{:?}: traffic stopped; draining", started.elapsed());

    // Drain: until every acknowledged message is shown and every client crash happened (each
    // unacknowledged batch fetched again and handled).
    let admin = server_client(&url, stack.keys_dir.path()).await;
    let js = jetstream::new(admin);
    let deadline = Instant::now() + DRAIN;
    loop {
        let crashes_left: usize = crashes.iter().map(|c| c.lock().unwrap().len()).sum();
        if ledger.outstanding() == 0 && crashes_left == 0 {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "drain incomplete: {} acknowledged messages not shown, {crashes_left} client \
                 crashes pending",
                ledger.outstanding()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_receiving.store(true, Ordering::SeqCst);
    for receiver in receivers {
        receiver.await.expect("a receiver panicked");
    }
    // One more fetch each, which acknowledges the last batch received (and must bring nothing
    // new): then nothing may be left behind.
    for user in &users {
        let conn = user.connect(&url, PATIENCE).await;
        let deadline = Instant::now() + PATIENCE;
        loop {
            match conn.receive(&user.store, 100, Duration::ZERO).await {
                Ok(messages) => {
                    ledger.shown(user.key.public_key(), &messages);
                    break;
                }
                Err(err) => assert!(
                    Instant::now() < deadline,
                    "{}'s last fetch: {err}",
                    user.name
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = conn.close().await;
    }
    let mut left = Vec::new();
    for user in &users {
        let held = inbox_held(&js, &user.key.public_key()).await;
        if held != Some(0) {
            left.push(format!(
                "{}: {held:?} messages held, floor {:?}",
                user.name,
                user.store.inbox_floor().unwrap()
            ));
        }
    }
    eprintln!("{:?}: drained", started.elapsed());

    let keys: Vec<_> = users.iter().map(|user| user.key.public_key()).collect();
    let stores: Vec<_> = users
        .iter()
        .map(|user| (user.key.public_key(), &user.store))
        .collect();
    let (summary, problems) = ledger.check(&stores, &keys);
    let suite = match soak_secs {
        Some(secs) => format!("delivery under faults (soak, {secs} s)"),
        None => "delivery under faults".to_owned(),
    };
    summary.report(&suite);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(
        (summary.lost, summary.duplicates, summary.unexpected),
        (0, 0, 0)
    );
    let undecryptable: usize = users
        .iter()
        .flat_map(|user| keys.iter().map(move |peer| (user, peer)))
        .map(|(user, peer)| {
            user.store
                .messages(peer)
                .unwrap()
                .iter()
                .filter(|view| view.message.content_type == UNDECRYPTABLE_CONTENT_TYPE)
                .count()
        })
        .sum();
    eprintln!("{undecryptable} messages undecryptable");
    assert_eq!(undecryptable, 0, "every message decrypted");
    assert!(left.is_empty(), "left behind in KEZ_MAIL: {left:?}");
    assert_eq!(in_stream(&js).await, Some(0), "messages left in the stream");
    assert!(
        summary.faults >= SCHEDULE.len(),
        "only {} faults injected",
        summary.faults
    );
    assert!(summary.acked > 100, "too little traffic: {}", summary.acked);
}
