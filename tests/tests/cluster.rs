//! kez-chat on a three-node NATS cluster (issue 9, item 4): three nats-servers on loopback, made
//! from the committed `nats/cluster/node.conf.template`, two kez-chat-server instances with
//! `--kv-replicas 3`, and clients on the kez-client library. One node (the inbox stream's
//! leader) is killed while messages flow: every acknowledged message must still be delivered
//! exactly once, and the services must keep answering with the node down. A user costs the
//! cluster key-value entries only: the inbox stream (`KEZ_MAIL`, R3) has no consumers at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use kez_chat_server::nats_conf;
use kez_client::{Connection, Contact};
use kez_proto::subjects::MAIL_STREAM;
use kez_tests::callout::server_client;
use kez_tests::chat::{ChatUser, Ledger, inbox_held};
use kez_tests::cluster::{NatsCluster, wait_for_jetstream};
use kez_tests::kez_server::test_handle;
use kez_tests::process::KezServerProcess;

/// Messages each sender sends.
const PER_SENDER: usize = 60;
/// How long any one step may take to recover from the node's death (leader elections,
/// reconnects).
const PATIENCE: Duration = Duration::from_secs(30);

/// The streams kez-chat-server keeps: the inbox and the key-value buckets (without pinning).
const STREAMS: &[&str] = &[
    MAIL_STREAM,
    "KV_kez_handles",
    "KV_kez_keys",
    "KV_kez_chain_links",
    "KV_kez_chain_heads",
    "KV_kez_chain_states",
    "KV_kez_devices",
    "KV_kez_disabled",
];

/// The stream's current leader (a node name), once it has one.
/// Every stream kez-chat keeps has three replicas, on three nodes.
async fn assert_three_replicas(js: &jetstream::Context) {
    for name in STREAMS {
        let info = js
            .get_stream(*name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{name}");
        let cluster_info = info.cluster.as_ref().expect("clustered");
        assert_eq!(cluster_info.replicas.len(), 2, "{name}: {cluster_info:?}");
    }
}

/// The inbox stream has no consumers: no user's inbox is a consumer to replicate, elect or
/// create. Answers how many messages it holds.
async fn assert_no_inbox_consumers(js: &jetstream::Context) -> u64 {
    let info = js
        .get_stream(MAIL_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.state.consumer_count, 0,
        "{MAIL_STREAM}: {:?}",
        info.state
    );
    info.state.messages
}

async fn leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let mut stream = js.get_stream(stream).await.ok()?;
    stream.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

/// Sends `count` messages from `conn` to `to`, each retried as a new message (a new body and
/// id) until the stream acknowledges one, and records everything in `ledger`.
async fn send_all(
    ledger: Ledger,
    conn: Connection,
    from: &'static str,
    to: Contact,
    count: usize,
) -> Connection {
    let me = conn.public_key();
    for i in 0..count {
        let deadline = Instant::now() + PATIENCE;
        for attempt in 0.. {
            let body = format!("{from} to {} #{i} try {attempt}", to.handle);
            ledger.attempt(me, to.key, body.as_bytes());
            match conn.send(&to, "text", body.as_bytes()).await {
                Ok(sent) => {
                    ledger.acked(&sent);
                    // Paced, so that the flow spans the node's death.
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    break;
                }
                Err(err) => {
                    ledger.send_failed();
                    assert!(
                        Instant::now() < deadline,
                        "{from}: message {i} not acknowledged within {PATIENCE:?}: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    conn
}

/// Receives into `user`'s store until `done` is set and nothing acknowledged is outstanding,
/// or the deadline passes; gives the connection back.
async fn receive_all(
    ledger: Ledger,
    user: Arc<ChatUser>,
    conn: Connection,
    done: Arc<AtomicBool>,
    deadline: Instant,
) -> Connection {
    let me = conn.public_key();
    while Instant::now() < deadline {
        ledger.operation();
        match conn
            .receive(&user.store, 100, Duration::from_millis(300))
            .await
        {
            Ok(messages) => ledger.shown(me, &messages),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        if done.load(Ordering::SeqCst) && ledger.outstanding() == 0 {
            break;
        }
    }
    conn
}

/// Retries `what` until it answers OK, for at most [`PATIENCE`]; returns how long it took.
async fn answers<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    name: &str,
    mut what: impl FnMut() -> F,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        match what().await {
            Ok(answer) => return (answer, started.elapsed()),
            Err(err) => assert!(
                started.elapsed() < PATIENCE,
                "{name}: no answer within {PATIENCE:?} with a node down: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 3-node cluster with the kez accounts, and two kez-chat-server instances with R3 state,
/// each given every node (starting with a different one). Registrations retried while a node is
/// down all come from 127.0.0.1: the per-address registration limit (hostile_clients.rs tests
/// it) is off, and so are the limits in `extra_args`.
struct ServedCluster {
    cluster: NatsCluster,
    admin: async_nats::Client,
    _servers: [KezServerProcess; 2],
    _keys_dir: tempfile::TempDir,
}

impl ServedCluster {
    async fn start(extra_args: &[&str]) -> ServedCluster {
        let keys_dir = tempfile::Builder::new()
            .prefix("kez-keys-")
            .tempdir()
            .unwrap();
        let keys = nats_conf::keygen(keys_dir.path()).unwrap().0;
        let cluster = NatsCluster::start(&nats_conf::render_auth(&keys));
        let admin = server_client(&cluster.urls_from(0), keys_dir.path()).await;
        wait_for_jetstream(&admin, PATIENCE).await;
        let mut args = vec!["--kv-replicas", "3", "--register-limit-per-hour", "0"];
        args.extend_from_slice(extra_args);
        let first = KezServerProcess::spawn_with_callout_args(
            &cluster.urls_from(0),
            keys_dir.path(),
            &keys.issuer,
            &args,
        )
        .await;
        let second = KezServerProcess::spawn_with_callout_args(
            &cluster.urls_from(1),
            keys_dir.path(),
            &keys.issuer,
            &args,
        )
        .await;
        ServedCluster {
            cluster,
            admin,
            _servers: [first, second],
            _keys_dir: keys_dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_while_messages_flow_and_nothing_acknowledged_is_lost() {
    let started = Instant::now();
    let served = ServedCluster::start(&[]).await;
    let mut cluster = served.cluster;
    let admin = served.admin;
    let js = jetstream::new(admin.clone());
    eprintln!("{:?}: cluster and servers up", started.elapsed());

    assert_three_replicas(&js).await;

    // alice → bob and carol → dave, each user on another first node.
    let mut users = Vec::new();
    for (i, name) in ["alice", "bob", "carol", "dave"].iter().enumerate() {
        let user = ChatUser::register(&cluster.urls_from(i % 3), name, PATIENCE).await;
        users.push(Arc::new(user));
    }
    let [alice, bob, carol, dave] = [0, 1, 2, 3].map(|i| users[i].clone());
    // Registered users cost the inbox stream nothing.
    assert_no_inbox_consumers(&js).await;
    let alice_conn = alice.connect(&cluster.urls_from(0), PATIENCE).await;
    let carol_conn = carol.connect(&cluster.urls_from(1), PATIENCE).await;
    let bob_conn = bob.connect(&cluster.urls_from(2), PATIENCE).await;
    let dave_conn = dave.connect(&cluster.urls_from(0), PATIENCE).await;
    let to_bob = alice.add(&alice_conn, "bob", PATIENCE).await;
    let to_dave = carol.add(&carol_conn, "dave", PATIENCE).await;

    eprintln!("{:?}: servers, users and contacts ready", started.elapsed());
    let ledger = Ledger::default();
    let done = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(120);
    let senders = [
        tokio::spawn(send_all(
            ledger.clone(),
            alice_conn.clone(),
            "alice",
            to_bob,
            PER_SENDER,
        )),
        tokio::spawn(send_all(
            ledger.clone(),
            carol_conn,
            "carol",
            to_dave,
            PER_SENDER,
        )),
    ];
    let receivers = [
        tokio::spawn(receive_all(
            ledger.clone(),
            bob.clone(),
            bob_conn,
            done.clone(),
            deadline,
        )),
        tokio::spawn(receive_all(
            ledger.clone(),
            dave.clone(),
            dave_conn,
            done.clone(),
            deadline,
        )),
    ];

    // Once a third of the messages are acknowledged, kill the inbox stream's leader.
    while ledger.acked_count() < 2 * PER_SENDER / 3 {
        assert!(Instant::now() < deadline, "messages do not flow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old_leader = leader(&js, MAIL_STREAM).await.expect("a leader");
    let victim = cluster.index_of(&old_leader).expect("a node's name");
    cluster.kill(victim);
    ledger.fault();
    let acked_before = ledger.acked_count();
    eprintln!(
        "{:?}: killed {old_leader}, the leader of {MAIL_STREAM}, after {acked_before} of {} \
         messages",
        started.elapsed(),
        2 * PER_SENDER
    );

    // With the node down, the services answer: lookups, chains, registrations, appends.
    let dave_handle = test_handle("@dave");
    let (profile, took) = answers("lookup @dave", || alice_conn.lookup(&dave_handle)).await;
    assert_eq!(profile.key, dave.key.public_key());
    eprintln!("lookup answered {took:?} after the kill");
    let dave_key = dave.key.public_key();
    let (chain, _) = answers("dave's sigchain", || alice_conn.chain(&dave_key)).await;
    assert_eq!(chain.seq(), 1);
    let (head, _) = answers("dave's head", || alice_conn.head(&dave_key)).await;
    assert_eq!(head.seq, 1);
    // A new user registers and writes a first link (KV creates on the replicated buckets).
    let live = (victim + 1) % 3;
    let erin = ChatUser::register(&cluster.urls_from(live), "erin", PATIENCE).await;
    // Replicas answer direct reads, so a read right after a write may come from one that has
    // not applied it yet: poll until the new link shows (it must, within the patience).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let erin_handle = test_handle("@erin");
        let (profile, _) = answers("lookup @erin", || alice_conn.lookup(&erin_handle)).await;
        assert_eq!(profile.key, erin.key.public_key());
        if profile.sigchain.map(|head| head.seq) == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "@erin's first link never showed in lookup"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        ledger.operation();
    }

    eprintln!("{:?}: the services answered", started.elapsed());
    for sender in senders {
        sender.await.expect("sender");
    }
    eprintln!("{:?}: every message sent", started.elapsed());
    done.store(true, Ordering::SeqCst);
    let mut receiving = Vec::new();
    for receiver in receivers {
        receiving.push(receiver.await.expect("receiver"));
    }
    assert!(
        acked_before < 2 * PER_SENDER,
        "every message was acknowledged before the kill: nothing flowed through it"
    );
    let new_leader = leader(&js, MAIL_STREAM).await;
    assert!(
        new_leader.is_some() && new_leader.as_deref() != Some(old_leader.as_str()),
        "{MAIL_STREAM} has no new leader: {new_leader:?}"
    );
    // One more fetch each acknowledges the last batch received, and must bring nothing new:
    // then nothing is left behind, and still no consumer was made.
    for (user, conn) in [&bob, &dave].into_iter().zip(&receiving) {
        let (last, _) = answers(&format!("{}'s last fetch", user.name), || {
            conn.receive(&user.store, 100, Duration::ZERO)
        })
        .await;
        ledger.shown(user.key.public_key(), &last);
        // The stream's leader answers the count, after the purge the fetch waited for.
        let (held, _) = answers("the inbox stream's info", || async {
            inbox_held(&js, &user.key.public_key())
                .await
                .ok_or("no answer")
        })
        .await;
        assert_eq!(held, 0, "{}'s inbox after the last fetch", user.name);
    }
    assert_eq!(
        assert_no_inbox_consumers(&js).await,
        0,
        "messages left behind"
    );

    let senders = [alice.key.public_key(), carol.key.public_key()];
    let stores = [
        (bob.key.public_key(), &bob.store),
        (dave.key.public_key(), &dave.store),
    ];
    let (summary, problems) = ledger.check(&stores, &senders);
    summary.report("cluster (3 nodes, 1 killed)");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(summary.acked, 2 * PER_SENDER);
    assert_eq!(
        (summary.lost, summary.duplicates, summary.unexpected),
        (0, 0, 0)
    );

    // The dead node comes back on its store and catches up: every replica current again.
    cluster.restart(victim);
    let caught_up = Instant::now() + PATIENCE;
    for name in STREAMS {
        loop {
            let lagging = match js.get_stream(*name).await {
                Ok(mut stream) => match stream.info().await {
                    Ok(info) => info.cluster.as_ref().map_or(usize::MAX, |cluster| {
                        cluster.replicas.iter().filter(|peer| !peer.current).count()
                            + (2 - cluster.replicas.len().min(2))
                    }),
                    Err(_) => usize::MAX,
                },
                Err(_) => usize::MAX,
            };
            if lagging == 0 {
                break;
            }
            assert!(
                Instant::now() < caught_up,
                "{name}: {old_leader} did not catch up within {PATIENCE:?}; logs:\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("{:?}: {old_leader} is back and current", started.elapsed());
    drop(cluster);
}

/// `nats/cluster/node1.conf`…`node3.conf` are the template with `NODE_N` replaced outside
/// comments, as the loop at the template's top makes them.
#[test]
fn committed_node_confs_are_the_template() {
    let template = std::fs::read_to_string(kez_tests::cluster::node_template_path()).unwrap();
    for n in 1..=kez_tests::cluster::NODES {
        let mut expected =
            format!("# node{n}.conf: generated from node.conf.template, NODE_N={n}.\n");
        for line in template.lines() {
            if line.starts_with('#') {
                expected.push_str(line);
            } else {
                expected.push_str(&line.replace("NODE_N", &n.to_string()));
            }
            expected.push('\n');
        }
        let path = kez_tests::cluster::node_template_path().with_file_name(format!("node{n}.conf"));
        let committed = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            committed,
            expected,
            "{} is not the template for node {n}: regenerate it (the loop at the top of \
             node.conf.template)",
            path.display()
        );
    }
}

/// `nats/cluster/kez-accounts.conf` is what `kez-chat-server nats-conf` renders after its
/// JetStream block, with placeholders for the keys.
#[test]
fn committed_accounts_conf_is_what_the_server_renders() {
    let path = kez_tests::cluster::node_template_path().with_file_name("kez-accounts.conf");
    let committed = std::fs::read_to_string(&path).unwrap();
    let rendered = nats_conf::render_auth(&nats_conf::PublicKeys {
        issuer: "A_CALLOUT_ISSUER_PUBLIC_KEY".into(),
        auth_user: "U_SERVER_AUTH_USER_PUBLIC_KEY".into(),
        server_user: "U_SERVER_USER_PUBLIC_KEY".into(),
        system_user: "U_SERVER_SYSTEM_USER_PUBLIC_KEY".into(),
    });
    // What `sed -n '/^# Accounts:/,$p'` keeps: from the first line starting so.
    let start = committed
        .find("\n# Accounts:")
        .expect("the rendered part starts with a '# Accounts:' line")
        + 1;
    assert_eq!(
        &committed[start..],
        rendered,
        "{} differs from nats_conf::render_auth",
        path.display()
    );
}

/// Two instances started at the same moment on a fresh cluster with R3 both serve promptly:
/// creating the same streams at once must not stall them (it once took 55 s where one alone
/// took 0.4 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_started_at_once_on_a_fresh_cluster_both_serve() {
    let keys_dir = tempfile::Builder::new()
        .prefix("kez-keys-")
        .tempdir()
        .unwrap();
    let keys = nats_conf::keygen(keys_dir.path()).unwrap().0;
    let cluster = NatsCluster::start(&nats_conf::render_auth(&keys));
    let admin = server_client(&cluster.urls_from(0), keys_dir.path()).await;
    wait_for_jetstream(&admin, PATIENCE).await;
    let replicas = ["--kv-replicas", "3"];
    let (urls_first, urls_second) = (cluster.urls_from(0), cluster.urls_from(1));
    let started = Instant::now();
    let (first, second) = tokio::join!(
        KezServerProcess::spawn_with_callout_args(
            &urls_first,
            keys_dir.path(),
            &keys.issuer,
            &replicas,
        ),
        KezServerProcess::spawn_with_callout_args(
            &urls_second,
            keys_dir.path(),
            &keys.issuer,
            &replicas,
        ),
    );
    let took = started.elapsed();
    eprintln!("both serving {took:?} after they started");
    // A stalled step waits out the JetStream request timeout (10 s); unstalled, both serve in
    // about a second.
    assert!(
        took < Duration::from_secs(8),
        "two instances took {took:?} to serve; logs:\n{}\n{}",
        first.log(),
        second.log()
    );
    assert_three_replicas(&jetstream::new(admin)).await;
    drop((first, second));
}

/// A receive waiting in a cluster gets each message its notification announces, even when the
/// replica that answers the server's read has not stored it yet when the notification comes
/// (the client asks again until its floor reaches the announced sequence): no message waits
/// for a later one to wake the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_receive_in_a_cluster_gets_every_announced_message() {
    let served = ServedCluster::start(&["--rate-limit-per-sec", "0"]).await;
    let cluster = &served.cluster;
    let alice = ChatUser::register(&cluster.urls_from(0), "alice", PATIENCE).await;
    let bob = Arc::new(ChatUser::register(&cluster.urls_from(1), "bob", PATIENCE).await);
    let alice_conn = alice.connect(&cluster.urls_from(0), PATIENCE).await;
    let to_bob = alice.add(&alice_conn, "bob", PATIENCE).await;
    let bob_conn = Arc::new(bob.connect(&cluster.urls_from(2), PATIENCE).await);
    for round in 0..20 {
        let waiting = tokio::spawn({
            let (bob, bob_conn) = (bob.clone(), bob_conn.clone());
            async move { bob_conn.receive(&bob.store, 10, PATIENCE).await }
        });
        // Let the receive reach its wait, so the notification is what wakes it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = format!("round {round}");
        answers("send", || {
            alice_conn.send(&to_bob, "text/plain", body.as_bytes())
        })
        .await;
        let received = waiting.await.unwrap().unwrap();
        let bodies: Vec<&[u8]> = received.iter().map(|m| m.body.as_slice()).collect();
        assert_eq!(bodies, [body.as_bytes()], "round {round}");
    }
}

/// A revoked device's connection on one node of a cluster ends within 5 s: the server asks
/// every node for the device's connections and has the node holding it close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_on_another_node_is_disconnected() {
    use kez_core::sigchain::DeviceKind;
    use kez_core::{SecretKey, Sigchain, UnsignedLink};
    use kez_tests::callout::{connect_as, register};
    use kez_tests::kez_server::call;
    use kez_tests::requests::{nats_endpoint, now};

    let served = ServedCluster::start(&[]).await;
    let cluster = &served.cluster;
    // Alice on node 2, her laptop on node 3 only; the servers on whichever node they picked.
    let (alice_url, laptop_url) = (cluster.nodes[1].url(), cluster.nodes[2].url());
    let alice = Arc::new(SecretKey::generate());
    let (narrow, _) = connect_as(&alice_url, &alice).await.unwrap();
    register(&narrow, &alice, "alice").await.unwrap();
    let (alice_client, _) = connect_as(&alice_url, &alice).await.unwrap();
    let first = UnsignedLink::first(alice.public_key(), now(), nats_endpoint("nats"))
        .sign(&alice)
        .unwrap();
    call(&alice_client, "kez.sigchain.append", first.bytes().to_vec())
        .await
        .unwrap();
    let mut chain = Sigchain::start(first.bytes()).unwrap();
    let laptop = Arc::new(SecretKey::generate());
    let add = chain
        .add_device_link(now(), &alice, &laptop, "laptop", DeviceKind::Desktop)
        .unwrap();
    call(&alice_client, "kez.sigchain.append", add.bytes().to_vec())
        .await
        .unwrap();
    chain.append(add.bytes()).unwrap();

    let (disconnected, mut events) = tokio::sync::mpsc::unbounded_channel();
    let _laptop_client = kez_client::Connection::options_with_events(&laptop, move |event| {
        let disconnected = disconnected.clone();
        async move {
            if matches!(event, async_nats::Event::Disconnected) {
                let _ = disconnected.send(Instant::now());
            }
        }
    })
    .connect(laptop_url)
    .await
    .expect("the laptop connects");
    let revoke = chain
        .revoke_device_link(now(), &alice, laptop.public_key(), None)
        .unwrap();
    call(
        &alice_client,
        "kez.sigchain.append",
        revoke.bytes().to_vec(),
    )
    .await
    .unwrap();
    let revoked_at = Instant::now();
    let kicked = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("node 3 closes the revoked laptop's connection within 5 s")
        .unwrap();
    eprintln!(
        "cluster: time to kick on another node: {:?}",
        kicked - revoked_at
    );
}
