//! Devices as NATS credentials (PROTOCOL.md §6.2, §6.3), against a real nats-server with the
//! auth callout and an in-process kez-chat-server: a device its identity's chain added connects
//! with the device profile and reads only its own inbox; mail to a device key arrives only
//! there; a revoked device is refused at connect and as a recipient; an unknown key gets nothing
//! of anyone's mail; the identity key works as before; and no key serves two identities.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use kez_chat_server::config::ServerConfig;
use kez_chat_server::limits::{Limits, Rate};
use kez_chat_server::{kick, nats_conf};
use kez_core::sigchain::DeviceKind;
use kez_core::{PublicKey, SecretKey, Sigchain, SignedLink, UnsignedLink};
use kez_proto::mail::{FetchAnswer, FetchRequest};
use kez_proto::subjects::new_mail_subject;
use kez_tests::NatsServer;
use kez_tests::callout::{CalloutStack, Violation, connect_as, expect_violation, register};
use kez_tests::kez_server::{ServiceError, call};
use kez_tests::process::KezServerProcess;
use kez_tests::requests::{mail, nats_endpoint, now};
use tokio::sync::mpsc;

/// How long a refusal by the broker may take to arrive.
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// A registered identity with a sigchain, as the test keeps it.
struct Identity {
    key: Arc<SecretKey>,
    client: Client,
    chain: Sigchain,
}

impl Identity {
    /// Registers `name` for a fresh key on the stack and writes its first link.
    async fn new(stack: &CalloutStack, name: &str) -> Identity {
        Identity::new_at(&stack.nats.url(), name).await
    }

    /// Registers `name` for a fresh key on the broker at `url` and writes its first link.
    async fn new_at(url: &str, name: &str) -> Identity {
        let key = Arc::new(SecretKey::generate());
        let (narrow, _) = connect_as(url, &key).await.expect("a new key connects");
        register(&narrow, &key, name)
            .await
            .unwrap_or_else(|err| panic!("registering {name}: {err:?}"));
        narrow.drain().await.unwrap();
        let (client, _) = connect_as(url, &key)
            .await
            .expect("a registered key connects");
        let first = UnsignedLink::first(key.public_key(), now(), nats_endpoint("nats"))
            .sign(&key)
            .unwrap();
        append(&client, &first).await.expect("the first link");
        let chain = Sigchain::start(first.bytes()).unwrap();
        Identity { key, client, chain }
    }

    fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// The link adding `device` as `name`, signed by the identity key.
    fn add_link(&self, device: &SecretKey, name: &str) -> SignedLink {
        self.chain
            .add_device_link(now(), &self.key, device, name, DeviceKind::Desktop)
            .unwrap()
    }

    /// Appends `link` on the server and to the test's copy of the chain.
    async fn append(&mut self, link: SignedLink) {
        append(&self.client, &link).await.expect("the append");
        self.chain.append(link.bytes()).unwrap();
    }

    /// Adds a fresh device called `name`; returns its key.
    async fn add_device(&mut self, name: &str) -> Arc<SecretKey> {
        let device = Arc::new(SecretKey::generate());
        self.append(self.add_link(&device, name)).await;
        device
    }

    /// Revokes `device` on the chain.
    async fn revoke(&mut self, device: &SecretKey) {
        let link = self
            .chain
            .revoke_device_link(now(), &self.key, device.public_key(), None)
            .unwrap();
        self.append(link).await;
    }
}

async fn append(client: &Client, link: &SignedLink) -> Result<(), ServiceError> {
    call(client, "kez.sigchain.append", link.bytes().to_vec())
        .await
        .map(drop)
}

/// Sends `envelope` to `to`; the answer's sequence, or the refusal.
async fn send(client: &Client, to: &PublicKey, envelope: &[u8]) -> Result<u64, ServiceError> {
    let id = *kez_core::envelope::MessageId::random().as_bytes();
    let answer = call(client, "kez.mail.send", mail(to, id, envelope)).await?;
    let delivered: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    Ok(delivered["seq"].as_u64().expect("a sequence"))
}

/// The envelopes in the caller's inbox, from the start.
async fn inbox(client: &Client) -> Vec<Vec<u8>> {
    let body = serde_json::to_vec(&FetchRequest {
        after: 0,
        max: 256,
        time: 0,
        origins: false,
    })
    .unwrap();
    let answer = call(client, "kez.mail.fetch", body)
        .await
        .expect("the fetch is answered");
    let decoded = FetchAnswer::decode(&answer, false).expect("a fetch answer decodes");
    decoded
        .messages
        .iter()
        .map(|message| message.envelope.to_vec())
        .collect()
}

fn error_of(result: Result<impl std::fmt::Debug, ServiceError>) -> (u16, String) {
    let err = result.expect_err("a refusal");
    (err.code, err.name)
}

#[tokio::test]
async fn a_device_connects_and_reads_only_its_own_inbox() {
    let stack = CalloutStack::start().await;
    let mut alice = Identity::new(&stack, "alice").await;
    let bob = Identity::new(&stack, "bob").await;
    let laptop = alice.add_device("laptop").await;
    let (laptop_client, mut laptop_errors) = stack
        .connect_as(&laptop)
        .await
        .expect("an active device connects");

    send(&bob.client, &laptop.public_key(), b"for the laptop")
        .await
        .expect("mail to a device key is stored");
    send(&bob.client, &alice.public_key(), b"for alice's key")
        .await
        .expect("mail to the identity key is stored as before");
    assert_eq!(inbox(&laptop_client).await, [b"for the laptop".to_vec()]);
    assert_eq!(inbox(&alice.client).await, [b"for alice's key".to_vec()]);
    assert!(inbox(&bob.client).await.is_empty());

    // The device may send, as its identity.
    send(&laptop_client, &bob.public_key(), b"from the laptop")
        .await
        .expect("a device sends");
    assert_eq!(inbox(&bob.client).await, [b"from the laptop".to_vec()]);

    // It hears of its own new mail only.
    let own = new_mail_subject(&alice.public_key(), &laptop.public_key());
    let mut notes = laptop_client.subscribe(own).await.unwrap();
    laptop_client.flush().await.unwrap();
    send(&bob.client, &laptop.public_key(), b"again")
        .await
        .unwrap();
    tokio::time::timeout(REFUSED_WITHIN, notes.next())
        .await
        .expect("the device hears of its new mail")
        .expect("a notification");
    for other in [
        new_mail_subject(&alice.public_key(), &alice.public_key()),
        new_mail_subject(&bob.public_key(), &bob.public_key()),
    ] {
        let _ignored = laptop_client.subscribe(other.clone()).await.unwrap();
        expect_violation(
            &mut laptop_errors,
            Violation::Subscription,
            &other,
            REFUSED_WITHIN,
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_revoked_device_is_refused_at_connect_and_as_a_recipient() {
    let stack = CalloutStack::start().await;
    let mut alice = Identity::new(&stack, "alice").await;
    let bob = Identity::new(&stack, "bob").await;
    let laptop = alice.add_device("laptop").await;
    let phone = alice.add_device("phone").await;
    let (laptop_client, _) = stack.connect_as(&laptop).await.unwrap();
    alice.revoke(&laptop).await;

    // Its live connection reaches no mail any more, its own inbox included.
    let body = serde_json::to_vec(&FetchRequest {
        after: 0,
        max: 1,
        time: 0,
        origins: false,
    })
    .unwrap();
    assert_eq!(
        error_of(call(&laptop_client, "kez.mail.fetch", body).await),
        (403, "revoked_device".to_owned())
    );
    assert_eq!(
        error_of(send(&laptop_client, &bob.public_key(), b"still me").await),
        (403, "revoked_device".to_owned())
    );

    assert!(
        stack.connect_as(&laptop).await.is_err(),
        "a revoked device is refused"
    );
    assert_eq!(
        error_of(send(&bob.client, &laptop.public_key(), b"too late").await),
        (410, "recipient_revoked".to_owned())
    );
    // The other device and the identity key go on.
    let (phone_client, _) = stack.connect_as(&phone).await.expect("the phone connects");
    send(&bob.client, &phone.public_key(), b"hi phone")
        .await
        .unwrap();
    assert_eq!(inbox(&phone_client).await, [b"hi phone".to_vec()]);
    let (alice_again, _) = stack
        .connect_as(&alice.key)
        .await
        .expect("the identity key connects as before");
    assert!(inbox(&alice_again).await.is_empty());
}

#[tokio::test]
async fn an_unknown_key_reaches_no_mail() {
    let stack = CalloutStack::start().await;
    let bob = Identity::new(&stack, "bob").await;
    let stranger = Arc::new(SecretKey::generate());
    let (client, mut errors) = stack
        .connect_as(&stranger)
        .await
        .expect("an unknown key gets the narrow profile, to register");
    let _ignored = client
        .publish("kez.mail.fetch", b"{}".as_slice().into())
        .await;
    expect_violation(
        &mut errors,
        Violation::Publish,
        "kez.mail.fetch",
        REFUSED_WITHIN,
    )
    .await
    .unwrap();
    assert_eq!(
        error_of(send(&bob.client, &stranger.public_key(), b"nobody").await),
        (404, "unknown_recipient".to_owned())
    );
}

#[tokio::test]
async fn no_key_serves_two_identities() {
    let stack = CalloutStack::start().await;
    let mut alice = Identity::new(&stack, "alice").await;
    let mut bob = Identity::new(&stack, "bob").await;
    let laptop = alice.add_device("laptop").await;

    // Bob holds the laptop's secret (he counter-signs with it) and still cannot add it.
    let taken = bob.add_link(&laptop, "laptop");
    assert_eq!(
        error_of(append(&bob.client, &taken).await),
        (409, "device_in_use".to_owned())
    );
    // Nor alice's identity key.
    let alices = bob.add_link(&alice.key, "alice");
    assert_eq!(
        error_of(append(&bob.client, &alices).await),
        (409, "device_in_use".to_owned())
    );
    // Bob's chain goes on without them.
    let own = bob.add_device("own").await;
    assert!(stack.connect_as(&own).await.is_ok());

    // A device key registers no handle of its own.
    let (laptop_client, _) = stack.connect_as(&laptop).await.unwrap();
    let refused = register(&laptop_client, &laptop, "laptop").await;
    assert_eq!(error_of(refused), (409, "key_is_device".to_owned()));

    // The same link again (a retry after a lost answer) is fine: the claim is alice's.
    let again = alice.add_link(&SecretKey::generate(), "again");
    append(&alice.client, &again).await.unwrap();
    append(&alice.client, &again).await.unwrap();
    alice.chain.append(again.bytes()).unwrap();
}

#[tokio::test]
async fn an_identitys_devices_share_one_send_budget() {
    let stack = CalloutStack::start_configured(|config: &mut ServerConfig| {
        config.limits = Limits {
            send_per_key: Rate::new(0.001, 2),
            ..Limits::OFF
        };
    })
    .await;
    let mut alice = Identity::new(&stack, "alice").await;
    let bob = Identity::new(&stack, "bob").await;
    let laptop = alice.add_device("laptop").await;
    let (laptop_client, _) = stack.connect_as(&laptop).await.unwrap();
    send(&alice.client, &bob.public_key(), b"1").await.unwrap();
    send(&laptop_client, &bob.public_key(), b"2").await.unwrap();
    assert_eq!(
        error_of(send(&laptop_client, &bob.public_key(), b"3").await),
        (429, "rate_limited".to_owned())
    );
    assert_eq!(
        error_of(send(&alice.client, &bob.public_key(), b"3").await),
        (429, "rate_limited".to_owned())
    );
}

/// How long the broker may take to end a revoked device's live connection (PROTOCOL.md §6.2).
const KICKED_WITHIN: Duration = Duration::from_secs(5);
/// Past the server's second look for a revoked device's connections (`kick::SECOND_LOOK_AFTER`):
/// by then it has done everything it would to any connection.
const EVERY_LOOK_DONE: Duration = Duration::from_secs(7);

/// Connects as `key` with the real client's options, reporting the connection's events
/// (`Disconnected`, `Connected`, ...) on the returned channel.
async fn connect_watched(
    url: &str,
    key: &Arc<SecretKey>,
) -> (Client, mpsc::UnboundedReceiver<async_nats::Event>) {
    let (events, received) = mpsc::unbounded_channel();
    let client = kez_client::Connection::options_with_events(key, move |event| {
        let events = events.clone();
        async move {
            let _ = events.send(event);
        }
    })
    .connect(url)
    .await
    .expect("an active key connects");
    (client, received)
}

/// Waits up to `within` for `events` to report a disconnection; when it did.
async fn disconnected(
    events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
    within: Duration,
) -> Option<Instant> {
    tokio::time::timeout(within, async {
        while let Some(event) = events.recv().await {
            if matches!(event, async_nats::Event::Disconnected) {
                return Some(Instant::now());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Who the broker lists as connected in `APP` under `key`'s nkey, asked as the server's
/// system user (what kez-chat-server itself asks before it kicks).
async fn connections_of(stack: &CalloutStack, key: &SecretKey) -> usize {
    let seed =
        std::fs::read_to_string(stack.keys_dir.path().join(nats_conf::SYSTEM_USER_SEED_FILE))
            .unwrap();
    let system = async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
        .connect(stack.nats.url())
        .await
        .expect("the system user connects");
    let answer = system
        .request(
            kick::CONNZ_SUBJECT,
            kick::connz_request(&key.public_key()).into(),
        )
        .await
        .expect("nats-server answers CONNZ");
    kick::parse_connz(&answer.payload).unwrap().cids.len()
}

#[tokio::test]
async fn a_revoked_devices_live_connection_ends_within_five_seconds() {
    let stack = CalloutStack::start().await;
    let mut alice = Identity::new(&stack, "alice").await;
    let bob = Identity::new(&stack, "bob").await;
    let laptop = alice.add_device("laptop").await;
    let phone = alice.add_device("phone").await;
    let url = stack.nats.url();
    let (laptop_client, mut laptop_events) = connect_watched(&url, &laptop).await;
    let (phone_client, mut phone_events) = connect_watched(&url, &phone).await;
    // Both listen for their new mail, as `kez-chat listen` does.
    let mut laptop_notes = laptop_client
        .subscribe(new_mail_subject(&alice.public_key(), &laptop.public_key()))
        .await
        .unwrap();
    let mut phone_notes = phone_client
        .subscribe(new_mail_subject(&alice.public_key(), &phone.public_key()))
        .await
        .unwrap();
    laptop_client.flush().await.unwrap();
    phone_client.flush().await.unwrap();
    assert_eq!(connections_of(&stack, &laptop).await, 1);

    // The phone revokes the laptop (any active device may).
    let revoke = alice
        .chain
        .revoke_device_link(now(), &phone, laptop.public_key(), Some("stolen"))
        .unwrap();
    append(&phone_client, &revoke)
        .await
        .expect("the revocation");
    let revoked_at = Instant::now();
    alice.chain.append(revoke.bytes()).unwrap();

    let kicked = disconnected(&mut laptop_events, KICKED_WITHIN)
        .await
        .expect("the broker ends the revoked laptop's connection within 5 s");
    eprintln!(
        "time to kick: {:?} from the revocation's answer",
        kicked - revoked_at
    );
    assert_eq!(
        connections_of(&stack, &laptop).await,
        0,
        "no connection of the laptop is left, its reconnects are refused"
    );
    // The client keeps trying, and the callout keeps refusing: it never hears of mail again.
    tokio::time::sleep(EVERY_LOOK_DONE).await;
    assert_ne!(
        laptop_client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert!(stack.connect_as(&laptop).await.is_err());

    // The phone and the identity key stayed connected throughout, and mail reaches the phone.
    while let Ok(event) = phone_events.try_recv() {
        assert!(
            !matches!(event, async_nats::Event::Disconnected),
            "the phone's connection was not touched"
        );
    }
    assert_eq!(
        phone_client.connection_state(),
        async_nats::connection::State::Connected
    );
    assert_eq!(
        alice.client.connection_state(),
        async_nats::connection::State::Connected
    );
    send(&bob.client, &phone.public_key(), b"for the phone")
        .await
        .unwrap();
    tokio::time::timeout(KICKED_WITHIN, phone_notes.next())
        .await
        .expect("the phone hears of its new mail")
        .expect("a notification");
    assert_eq!(inbox(&phone_client).await, [b"for the phone".to_vec()]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), laptop_notes.next())
            .await
            .is_err(),
        "the laptop hears nothing"
    );
}

/// A deployment from before the system user: three seed files, and a broker config without a
/// `SYS` user. The server creates the fourth seed, warns once that the config lacks it, and
/// serves; a revoked device is still refused at connect and in its requests.
#[tokio::test]
async fn a_config_without_the_system_user_still_serves_and_refuses_revoked_devices() {
    let keys_dir = tempfile::tempdir().unwrap();
    let (keys, _) = nats_conf::keygen(keys_dir.path()).unwrap();
    // The config as the previous release rendered it: `SYS: {}`, two `auth_users`.
    let config = nats_conf::render_auth(&keys);
    let sys_start = config.find("  SYS: {\n").expect("a SYS account");
    let sys_end = sys_start + config[sys_start..].find("\n  }\n").expect("its end") + 5;
    let old_config = format!(
        "{}  SYS: {{}}\n{}",
        &config[..sys_start],
        &config[sys_end..]
    )
    .replace(&format!(", \"{}\"", keys.system_user), "");
    assert!(!old_config.contains(&keys.system_user), "{old_config}");
    let nats = NatsServer::start_with(&old_config);
    let sys_seed = keys_dir.path().join(nats_conf::SYSTEM_USER_SEED_FILE);
    std::fs::remove_file(&sys_seed).unwrap();
    let server =
        KezServerProcess::spawn_with_callout(&nats.url(), keys_dir.path(), &keys.issuer).await;
    let mode = std::fs::metadata(&sys_seed).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the start created the missing seed");
    assert_eq!(
        nats_conf::public_keys(keys_dir.path()).unwrap().issuer,
        keys.issuer,
        "and left the others as they were"
    );
    let log = server.log();
    assert_eq!(
        log.matches("nats-server's config lacks the server's system user")
            .count(),
        1,
        "{log}"
    );

    let url = nats.url();
    // Not in `auth_users`, the system user goes to the callout, which refuses the server's own
    // key (an unknown key would get the unregistered profile).
    let sys = std::fs::read_to_string(&sys_seed).unwrap();
    assert!(
        async_nats::ConnectOptions::with_nkey(sys.trim().to_owned())
            .connect(&url)
            .await
            .is_err(),
        "the callout refuses the server's system user"
    );
    let mut alice = Identity::new_at(&url, "alice").await;
    let laptop = alice.add_device("laptop").await;
    let (laptop_client, _) = connect_as(&url, &laptop).await.unwrap();
    alice.revoke(&laptop).await;
    assert!(
        connect_as(&url, &laptop).await.is_err(),
        "a revoked device is refused"
    );
    let body = serde_json::to_vec(&FetchRequest {
        after: 0,
        max: 1,
        time: 0,
        origins: false,
    })
    .unwrap();
    assert_eq!(
        error_of(call(&laptop_client, "kez.mail.fetch", body).await),
        (403, "revoked_device".to_owned())
    );
    let log = server.log();
    assert_eq!(
        log.matches("lacks the server's system user").count(),
        1,
        "one warning only: {log}"
    );
}

/// The callout remembers registrations (ARCHITECTURE.md, connect flow), never a key's
/// standing: with alice's registration remembered (her key connected), a disable written by
/// another process (as `kez-chat-server admin disable` does, through a store of its own) and
/// her chain revoking her own key each refuse her next connect at once, without a wait.
#[tokio::test]
async fn a_remembered_registration_is_refused_at_once_when_disabled_or_revoked() {
    let stack = CalloutStack::start().await;
    let mut alice = Identity::new(&stack, "alice").await;
    let phone = alice.add_device("phone").await;
    let (phone_client, _) = stack.connect_as(&phone).await.expect("the phone connects");
    stack
        .connect_as(&alice.key)
        .await
        .expect("alice connects: her registration is remembered now");

    let config = CalloutStack::config(&stack.nats, &stack.keys_dir, &stack.keys);
    let admin = kez_chat_server::open_store(&config).await.unwrap();
    let disabled = kez_chat_server::store::DisabledRecord {
        handle: kez_core::Handle::parse("alice", kez_tests::kez_server::TEST_DOMAIN).unwrap(),
        since: now(),
    };
    admin
        .set_disabled(alice.public_key(), Some(&disabled))
        .await
        .unwrap();
    let refused = stack.connect_as(&alice.key).await.map(drop).unwrap_err();
    assert_eq!(
        refused.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation,
        "disabled: refused at the next connect ({refused})"
    );
    admin.set_disabled(alice.public_key(), None).await.unwrap();
    stack
        .connect_as(&alice.key)
        .await
        .expect("enabled again: connects");

    // The phone revokes alice's own key; the handle stays hers, served to the phone.
    let revoke = alice
        .chain
        .revoke_device_link(now(), &phone, alice.public_key(), None)
        .unwrap();
    append(&phone_client, &revoke)
        .await
        .expect("the phone revokes the identity key");
    let refused = stack.connect_as(&alice.key).await.map(drop).unwrap_err();
    assert_eq!(
        refused.kind(),
        async_nats::ConnectErrorKind::AuthorizationViolation,
        "revoked by its own chain: refused at the next connect ({refused})"
    );
    stack
        .connect_as(&phone)
        .await
        .expect("the phone connects as before");
}
