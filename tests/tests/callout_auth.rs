//! The auth callout against hostile clients, under load, and under operator control, with the
//! real `kez-chat-server` binary (its log holds the reason for every refusal) and a real
//! nats-server: in callout mode nats-server does not check an nkey client's signature, so
//! everything here rests on the callout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Auth, Client, ConnectErrorKind, ConnectOptions};
use data_encoding::{BASE32_NOPAD, BASE64};
use futures::StreamExt;
use kez_core::{KeyError, PublicKey, SecretKey, SignatureDomain};
use kez_tests::callout::{
    CalloutProcessStack, Violation, expect_violation, keys_and_broker, register, run_to_completion,
};
use kez_tests::kez_server::call;
use kez_tests::process::kez_chat_server_command;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long the server gets to write a refusal to its log (it logs before it answers, so this
/// only bounds a failing run).
const LOG_WITHIN: Duration = Duration::from_secs(3);

/// The log line the callout writes for every refusal.
const REFUSED: &str = "connection refused";

/// The nkey text (`U...`) of 32 raw bytes, whether or not they are a usable ed25519 key: how a
/// hostile client names a key it cannot hold.
fn user_nkey_of_raw(raw: &[u8; 32]) -> String {
    fn crc16_xmodem(data: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for &byte in data {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }
    let mut bytes = vec![20 << 3];
    bytes.extend_from_slice(raw);
    let crc = crc16_xmodem(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    BASE32_NOPAD.encode(&bytes)
}

/// Connect options that present `nkey` and, when `sign` gives one, a signature computed from
/// the server's nonce.
fn hostile_options(
    nkey: String,
    sign: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> ConnectOptions {
    let sign = Arc::new(sign);
    ConnectOptions::with_auth_callback(move |nonce| {
        let nkey = nkey.clone();
        let sign = sign.clone();
        async move {
            let mut auth = Auth::new();
            auth.nkey = Some(nkey);
            auth.signature = sign(&nonce);
            Ok(auth)
        }
    })
}

/// Bytes of the server's log written since `offset`.
fn log_since(stack: &CalloutProcessStack, offset: usize) -> String {
    stack.server.log().get(offset..).unwrap_or("").to_owned()
}

/// Waits for a refusal line holding `reason` in the log after `offset`.
async fn refusal_logged(
    stack: &CalloutProcessStack,
    offset: usize,
    reason: &str,
) -> Result<String, String> {
    let deadline = Instant::now() + LOG_WITHIN;
    loop {
        let new = log_since(stack, offset);
        if let Some(line) = new
            .lines()
            .find(|line| line.contains(REFUSED) && line.contains(reason))
        {
            return Ok(line.to_owned());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no {REFUSED:?} line with {reason:?} in the server log; new lines:\n{new}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One raw-protocol connection: reads INFO, sends `CONNECT` with `connect` (a JSON object, to
/// which the nonce signature is added by `sig`) and a PING; returns the server's first answer
/// line (`PONG` when admitted, `-ERR '...'` when refused).
async fn raw_connect(
    url: &str,
    connect: serde_json::Value,
    sig: impl FnOnce(&str) -> String,
) -> String {
    let (mut lines, _write) = raw_connect_sent(url, connect, sig).await;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("the server answers CONNECT")
            .unwrap()
            .unwrap_or_else(|| "<closed>".to_owned());
        if line != "+OK" {
            return line;
        }
    }
}

/// The first half of [`raw_connect`]: INFO read, `CONNECT` and PING sent; the connection's
/// lines to read and its write half (dropping it would end the connection).
async fn raw_connect_sent(
    url: &str,
    mut connect: serde_json::Value,
    sig: impl FnOnce(&str) -> String,
) -> (
    tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let address = url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await.unwrap().expect("INFO");
    let info: serde_json::Value =
        serde_json::from_str(info.strip_prefix("INFO ").expect("INFO line")).unwrap();
    let nonce = info["nonce"].as_str().expect("the server sends a nonce");
    connect["sig"] = serde_json::Value::String(sig(nonce));
    write
        .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
        .await
        .unwrap();
    (lines, write)
}

/// Every way to connect without proving a registered or unregistered KEZ key is refused, and
/// the server log says why; a valid key still connects before and after.
#[tokio::test]
async fn hostile_clients_are_refused_with_the_reason_logged() {
    let stack = CalloutProcessStack::start().await;
    let url = stack.nats.url();
    let honest = Arc::new(SecretKey::generate());
    stack
        .connect_as(&honest)
        .await
        .expect("a valid key connects");

    let mallory = Arc::new(SecretKey::generate());
    let victim = SecretKey::generate().public_key();
    assert_eq!(
        user_nkey_of_raw(mallory.public_key().as_bytes()),
        mallory.public_key().to_nkey(),
        "the raw nkey encoder agrees with kez-core"
    );
    // The identity point: a weak (small-order) key. With R = identity and S = 0, the signature
    // satisfies the cofactorless equation for every message, so only strict verification
    // (which refuses small-order keys) stops it.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert!(matches!(
        PublicKey::from_bytes(&identity),
        Err(KeyError::WeakKey)
    ));
    // The first y coordinate that is not on the curve.
    let not_a_point = (2u8..=255)
        .map(|y| {
            let mut raw = [0u8; 32];
            raw[0] = y;
            raw
        })
        .find(|raw| matches!(PublicKey::from_bytes(raw), Err(KeyError::InvalidPoint)))
        .expect("some small y is off the curve");
    let account = nkeys::KeyPair::new_account();
    // mallory's key plus a point of order 8: on the curve, of large order, but not in the
    // prime-order subgroup.
    let mixed_order = {
        let mut raw = *mallory.public_key().as_bytes();
        let torsion = curve25519_dalek::constants::EIGHT_TORSION[1];
        let point = curve25519_dalek::edwards::CompressedEdwardsY(raw)
            .decompress()
            .unwrap()
            + torsion;
        raw = point.compress().to_bytes();
        assert!(matches!(
            PublicKey::from_bytes(&raw),
            Err(KeyError::MixedOrder)
        ));
        raw
    };

    let signer = mallory.clone();
    let sign_other = move |_: &[u8]| {
        Some(
            signer
                .sign(SignatureDomain::NatsConnect, b"not-the-nonce")
                .to_bytes()
                .to_vec(),
        )
    };
    let signer = mallory.clone();
    let sign_nonce = move |nonce: &[u8]| {
        Some(
            kez_core::connect::sign_nonce(&signer, nonce)
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
    };
    let cases: Vec<(&str, ConnectOptions, &str)> = vec![
        (
            "signature over a different nonce",
            hostile_options(mallory.public_key().to_nkey(), sign_other),
            "the client's connect proof does not verify",
        ),
        (
            "someone else's key, signed with one's own",
            hostile_options(victim.to_nkey(), sign_nonce),
            "the client's connect proof does not verify",
        ),
        (
            "64 garbage signature bytes",
            hostile_options(mallory.public_key().to_nkey(), |_| Some(vec![0x5a; 64])),
            "the client's connect proof does not verify",
        ),
        (
            "7 garbage signature bytes",
            hostile_options(mallory.public_key().to_nkey(), |_| {
                Some(b"garbage".to_vec())
            }),
            "client nonce signature is not base64 of a 64-byte ed25519 signature",
        ),
        (
            "nkey without a signature",
            hostile_options(mallory.public_key().to_nkey(), |_| None),
            "client sent no nonce signature",
        ),
        (
            "weak key (identity point) with a signature valid under lax verification",
            hostile_options(user_nkey_of_raw(&identity), move |_| {
                let mut signature = vec![0u8; 64];
                signature[..32].copy_from_slice(&identity);
                Some(signature)
            }),
            "weak (small-order) point",
        ),
        (
            "mixed-order key (a real key plus a point of order 8), signing with the real key",
            {
                let signer = mallory.clone();
                hostile_options(user_nkey_of_raw(&mixed_order), move |nonce| {
                    Some(
                        kez_core::connect::sign_nonce(&signer, nonce)
                            .unwrap()
                            .to_bytes()
                            .to_vec(),
                    )
                })
            },
            "has a small-order component",
        ),
        (
            "key bytes that are not a curve point",
            hostile_options(user_nkey_of_raw(&not_a_point), |_| Some(vec![0u8; 64])),
            "are not a valid ed25519 public key",
        ),
        (
            "an account nkey (A...) with a valid signature",
            {
                let public = account.public_key();
                hostile_options(public, move |nonce| account.sign(nonce).ok())
            },
            "connect_opts.nkey must be",
        ),
        (
            "user and password",
            ConnectOptions::with_user_and_password("alice".into(), "hunter2".into()),
            "client presented no nkey",
        ),
        (
            "token",
            ConnectOptions::with_token("s3cret".into()),
            "client presented no nkey",
        ),
        (
            "no credentials",
            ConnectOptions::new(),
            "client presented no nkey",
        ),
    ];

    let mut failures = Vec::new();
    for (name, options, reason) in cases {
        let offset = stack.server.log().len();
        match options.connect(&url).await {
            Ok(_) => {
                failures.push(format!("{name}: CONNECTED"));
                continue;
            }
            Err(err) if err.kind() == ConnectErrorKind::AuthorizationViolation => {}
            Err(err) => failures.push(format!("{name}: refused, but not by authorization: {err}")),
        }
        match refusal_logged(&stack, offset, reason).await {
            Ok(line) => println!("refused  {name}: {line}"),
            Err(problem) => failures.push(format!("{name}: {problem}")),
        }
    }

    // A signature that is not base64 at all needs the raw protocol (clients encode for you).
    let offset = stack.server.log().len();
    let connect = serde_json::json!({
        "verbose": false, "pedantic": false, "lang": "raw", "version": "0", "protocol": 1,
        "nkey": mallory.public_key().to_nkey(),
    });
    let answer = raw_connect(&url, connect.clone(), |_| "%%% not base64 %%%".to_owned()).await;
    if answer != "-ERR 'Authorization Violation'" {
        failures.push(format!("signature that is not base64: answered {answer:?}"));
    }
    match refusal_logged(
        &stack,
        offset,
        "client nonce signature is not base64 of a 64-byte",
    )
    .await
    {
        Ok(line) => println!("refused  signature that is not base64: {line}"),
        Err(problem) => failures.push(format!("signature that is not base64: {problem}")),
    }
    // Control: the same raw client with a good signature in standard base64 (padded), which
    // nats-server also accepts from clients, is admitted.
    let signer = mallory.clone();
    let answer = raw_connect(&url, connect, move |nonce| {
        BASE64.encode(
            &kez_core::connect::sign_nonce(&signer, nonce.as_bytes())
                .unwrap()
                .to_bytes(),
        )
    })
    .await;
    if answer != "PONG" {
        failures.push(format!(
            "a good signature in standard base64 was refused: {answer:?}"
        ));
    }

    stack
        .connect_as(&honest)
        .await
        .expect("a valid key still connects");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `run` refuses to start when `--callout-issuer` is not the public key of the issuer seed in
/// `--keys-dir`: nats-server would reject every authorization it signs. The message names both.
#[tokio::test]
async fn the_server_refuses_to_start_when_the_issuer_disagrees_with_its_seed() {
    let (keys_dir, keys, nats) = keys_and_broker();
    let other = nkeys::KeyPair::new_account().public_key();
    let mut command = kez_chat_server_command();
    command
        .arg("run")
        .arg("--nats-url")
        .arg(nats.url())
        .arg("--keys-dir")
        .arg(keys_dir.path())
        .arg("--callout-issuer")
        .arg(&other);
    let output = run_to_completion(command).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "started with a mismatched issuer: {stderr}"
    );
    assert!(
        stderr.contains(&keys.issuer) && stderr.contains(&other),
        "the error names neither or only one of {} (the seed's) and {other} (the flag's):\n{stderr}",
        keys.issuer
    );
}

/// `kez-chat-server admin disable @x` makes the callout refuse x's key (the log names the
/// reason), `admin enable @x` lets it in again with the full profile; an unknown handle is a
/// clear error with a non-zero exit.
#[tokio::test]
async fn an_operator_disables_and_enables_a_handle() {
    let stack = CalloutProcessStack::start().await;
    let xavier = Arc::new(SecretKey::generate());
    let (narrow, _errors) = stack.connect_as(&xavier).await.unwrap();
    register(&narrow, &xavier, "xavier").await.unwrap();
    drop(narrow);
    stack
        .connect_as(&xavier)
        .await
        .expect("registered: connects");

    let offset = stack.server.log().len();
    let output = stack.admin(&["disable", "@xavier"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "disable failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("@xavier@kez.test"), "{stdout}");
    assert!(stdout.contains("disabled"), "{stdout}");

    let refused = stack.connect_as(&xavier).await.map(|_| ()).unwrap_err();
    assert_eq!(
        refused.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{refused}"
    );
    refusal_logged(
        &stack,
        offset,
        "@xavier@kez.test is disabled by the operator",
    )
    .await
    .unwrap();
    let bystander = Arc::new(SecretKey::generate());
    stack
        .connect_as(&bystander)
        .await
        .expect("other keys are unaffected");

    let output = stack.admin(&["enable", "@xavier"]).await;
    assert!(
        output.status.success(),
        "enable failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (client, mut errors) = stack
        .connect_as(&xavier)
        .await
        .expect("enabled: connects again");
    let head = call(
        &client,
        "kez.sigchain.head",
        serde_json::to_vec(&serde_json::json!({"key": xavier.public_key()})).unwrap(),
    )
    .await;
    assert_eq!(head.unwrap_err().code, 404, "with the full profile");
    assert!(errors.try_recv().is_err());

    let output = stack.admin(&["disable", "@nobody"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "disabling an unknown handle");
    assert!(
        stderr.contains("@nobody@kez.test is not registered"),
        "{stderr}"
    );
}

/// 200 clients, half registered, connect at once: every one is authorized (nats-server gives
/// the callout 2 s per client before it refuses), with the profile its registration gives.
/// They all come from one address and register over one connection, which the default rate
/// limits (PROTOCOL.md §5.5) would refuse: this measures the callout, so the binary runs with
/// the limits off (which also checks that the flags turn them off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_connects_are_all_authorized_in_time() {
    const REGISTERED: usize = 100;
    const UNREGISTERED: usize = 100;
    let stack = CalloutProcessStack::start_with_args(&[
        "--rate-limit-per-sec",
        "0",
        "--register-limit-per-hour",
        "0",
        "--connect-limit-per-sec",
        "0",
    ])
    .await;
    let keys: Vec<Arc<SecretKey>> = (0..REGISTERED + UNREGISTERED)
        .map(|_| Arc::new(SecretKey::generate()))
        .collect();
    // Registration requests are signed by their key, so one connection can carry them all.
    let (registrar, _errors) = stack.connect_as(&keys[REGISTERED]).await.unwrap();
    futures::stream::iter(keys[..REGISTERED].iter().enumerate())
        .for_each_concurrent(16, |(i, key)| {
            let registrar = registrar.clone();
            async move {
                register(&registrar, key, &format!("load{i:03}"))
                    .await
                    .unwrap_or_else(|err| panic!("registering load{i:03}: {err:?}"));
            }
        })
        .await;

    let started = Instant::now();
    let results = futures::future::join_all(keys.iter().map(|key| stack.connect_as(key))).await;
    let elapsed = started.elapsed();
    println!(
        "{} parallel connects ({REGISTERED} registered, {UNREGISTERED} not) took {elapsed:?}",
        keys.len()
    );
    let mut clients: Vec<Client> = Vec::new();
    let mut failures = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok((client, _errors)) => clients.push(client),
            Err(err) => failures.push(format!("client {i}: {err}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} connects failed in {elapsed:?}:\n{}\nserver log:\n{}",
        failures.len(),
        keys.len(),
        failures.join("\n"),
        stack.server.log()
    );
    assert!(
        !stack.server.log().contains(REFUSED),
        "the callout refused someone:\n{}",
        stack.server.log()
    );

    // The first registered client has the full profile, the first unregistered the narrow one.
    let head = call(
        &clients[0],
        "kez.sigchain.head",
        serde_json::to_vec(&serde_json::json!({"key": keys[0].public_key()})).unwrap(),
    )
    .await;
    assert_eq!(head.unwrap_err().code, 404);
    let (narrow, mut errors) = stack.connect_as(&keys[REGISTERED + 1]).await.unwrap();
    narrow
        .publish("kez.sigchain.head", bytes::Bytes::new())
        .await
        .unwrap();
    narrow.flush().await.unwrap();
    expect_violation(
        &mut errors,
        Violation::Publish,
        "kez.sigchain.head",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
}

/// A client of the previous release signs the broker's nonce without the KEZ connect tag. Such
/// proofs are accepted by default (old clients keep working through the upgrade), logged as
/// such, and refused with `--refuse-legacy-connect-proofs`; the tagged proof of today's
/// client is accepted either way.
#[tokio::test]
async fn untagged_connect_proofs_are_accepted_by_default_and_refused_when_configured() {
    let legacy_options = |key: &Arc<SecretKey>| {
        let seed = key.clone();
        hostile_options(key.public_key().to_nkey(), move |nonce| {
            // What kez-chat 0.1 sent: ed25519 over the nonce's bytes alone.
            let signer =
                nkeys::KeyPair::new_from_raw(nkeys::KeyPairType::User, seed_of(&seed)).unwrap();
            signer.sign(nonce).ok()
        })
    };
    let old = Arc::new(SecretKey::generate());

    let accepting = CalloutProcessStack::start().await;
    let offset = accepting.server.log().len();
    legacy_options(&old)
        .connect(&accepting.nats.url())
        .await
        .expect("an untagged proof is accepted by default");
    let deadline = Instant::now() + LOG_WITHIN;
    while !log_since(&accepting, offset).contains("proved its key the old way") {
        assert!(
            Instant::now() < deadline,
            "the legacy proof was not logged: {}",
            log_since(&accepting, offset)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    accepting
        .connect_as(&old)
        .await
        .expect("today's tagged proof is accepted");

    let refusing = CalloutProcessStack::start_with_args(&["--refuse-legacy-connect-proofs"]).await;
    let offset = refusing.server.log().len();
    let err = legacy_options(&old)
        .connect(&refusing.nats.url())
        .await
        .expect_err("an untagged proof is refused when configured");
    assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation);
    refusal_logged(&refusing, offset, "must be upgraded")
        .await
        .unwrap();
    refusing
        .connect_as(&old)
        .await
        .expect("today's tagged proof is still accepted");
}

/// The 32-byte seed of `key`, as its key file holds it.
fn seed_of(key: &SecretKey) -> [u8; 32] {
    let text = key.to_key_file();
    let hex = text
        .trim_end()
        .strip_prefix("ed25519-secret:")
        .expect("a key file line");
    let mut seed = [0u8; 32];
    data_encoding::HEXLOWER
        .decode_mut(hex.as_bytes(), &mut seed)
        .unwrap();
    seed
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// nats-server sends a connection's authorization request to the callout whether or not
/// anyone subscribes, then waits its whole authorization timeout and refuses the connection
/// (`-ERR 'Authorization Violation'`). A broker restarted while the server cannot answer (here:
/// stopped) takes such a connection; when the server's callout connection is back, the server
/// closes it at once (no `-ERR`), and a client reconnecting then is let in.
#[tokio::test]
async fn a_connect_the_broker_sent_to_no_callout_is_closed_when_the_callout_is_back() {
    let mut stack = CalloutProcessStack::start().await;
    let url = stack.nats.url();
    let key = Arc::new(SecretKey::generate());
    let offset = stack.server.log().len();
    signal(stack.server.id(), "STOP");
    stack.nats.restart();

    // Connected while no callout is subscribed: the request goes to no one.
    let connect = serde_json::json!({
        "verbose": false, "pedantic": false, "lang": "raw", "version": "0", "protocol": 1,
        "nkey": key.public_key().to_nkey(),
    });
    let signer = key.clone();
    let (mut lines, _write) = raw_connect_sent(&url, connect, move |nonce| {
        BASE64.encode(
            &kez_core::connect::sign_nonce(&signer, nonce.as_bytes())
                .unwrap()
                .to_bytes(),
        )
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(stack.server.id(), "CONT");

    // Closed by the server's sweep; nats-server's own timer would say why first.
    let mut answers = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("the broker ends the waiting connection")
    {
        answers.push(line);
    }
    assert!(
        answers.iter().all(|line| line == "+OK" || line == "PING"),
        "the waiting connection was answered {answers:?}, not closed"
    );
    let log = log_since(&stack, offset);
    assert!(
        log.contains("closing connections that wait for an authorization request"),
        "the server did not say it closed the waiting connection:\n{log}"
    );
    // The same key, reconnecting, is let in.
    let (client, _errors) = stack.connect_as(&key).await.unwrap();
    client.flush().await.unwrap();
}
