//! The HTTP shim (PROTOCOL.md §7) against a running server and a real nats-server: WebFinger
//! answers and refusals, health, metrics, and hostile connections. Well-formed requests go through
//! hyper's HTTP/1.1 client; malformed ones through a raw TCP socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HeaderValue;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use kez_chat_server::config::ServerConfig;
use kez_chat_server::http::HttpLimits;
use kez_core::{SecretKey, UnsignedLink};
use kez_tests::NatsServer;
use kez_tests::http::{self, Answer};
use kez_tests::kez_server::{KezServer, TEST_DOMAIN, call, call_ok};
use kez_tests::requests::{nats_endpoint, now, registration};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PUBLIC_NATS_URL: &str = "tls://chat.kez.test:4222";
const WEBFINGER: &str = "/.well-known/webfinger";
const JRD: &str = "application/jrd+json";

// The protocol's URIs, spelled out: changing one is a protocol change.
const REL_NATS: &str = "https://kez.lat/ns/rel/nats";
const REL_SIGCHAIN: &str = "https://kez.lat/ns/rel/sigchain";
const PROP_KEY: &str = "https://kez.lat/ns/key";
const PROP_HANDLE: &str = "https://kez.lat/ns/handle";
const PROP_SEQ: &str = "https://kez.lat/ns/sigchain-seq";
const PROP_HEAD: &str = "https://kez.lat/ns/sigchain-head";
const PROP_SUBJECT: &str = "https://kez.lat/ns/nats-subject";

struct Stack {
    nats: NatsServer,
    server: KezServer,
    client: async_nats::Client,
    http: SocketAddr,
}

async fn stack_with(limits: HttpLimits) -> Stack {
    let nats = NatsServer::start();
    let server = KezServer::start_with(&ServerConfig {
        http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        public_nats_url: PUBLIC_NATS_URL.to_owned(),
        http_limits: limits,
        ..ServerConfig::new(&nats.url(), TEST_DOMAIN)
    })
    .await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let http = server.http_addr().expect("the shim is on");
    Stack {
        nats,
        server,
        client,
        http,
    }
}

async fn stack() -> Stack {
    stack_with(HttpLimits::default()).await
}

/// Registers `name` for a new key.
async fn register(client: &async_nats::Client, name: &str) -> SecretKey {
    let key = SecretKey::generate();
    call(client, "kez.registry.register", registration(&key, name))
        .await
        .unwrap_or_else(|err| panic!("register {name}: {err:?}"));
    key
}

/// One request with `Host: kez.test`.
async fn request(addr: SocketAddr, method: &str, target: &str) -> Answer {
    http::request(addr, method, target, &[("host", "kez.test")], b"").await
}

async fn get(addr: SocketAddr, target: &str) -> Answer {
    request(addr, "GET", target).await
}

fn webfinger(resource: &str) -> String {
    format!("{WEBFINGER}?resource={resource}")
}

/// Sends `bytes` on a fresh connection and reads until the server closes it; returns what it
/// answered and how long the close took. A reset counts as a close.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open; so far: {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

fn expected_jrd(key: &SecretKey, head: Option<(u64, String)>) -> Value {
    let key = key.public_key().to_string();
    let (seq, hash) = match head {
        Some((seq, hash)) => (Value::from(seq.to_string()), Value::from(hash)),
        None => (Value::Null, Value::Null),
    };
    json!({
        "subject": "acct:alice@kez.test",
        "aliases": [key],
        "properties": {
            PROP_KEY: key,
            PROP_HANDLE: "@alice@kez.test",
            PROP_SEQ: seq,
            PROP_HEAD: hash,
        },
        "links": [
            { "rel": REL_NATS, "href": PUBLIC_NATS_URL },
            {
                "rel": REL_SIGCHAIN,
                "href": PUBLIC_NATS_URL,
                "properties": { PROP_SUBJECT: "kez.sigchain.get", PROP_KEY: key },
            },
        ],
    })
}

fn assert_jrd_headers(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.header("content-type"), Some(JRD));
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn webfinger_answers_the_jrd_of_a_registered_handle() {
    let stack = stack().await;
    let alice = register(&stack.client, "alice").await;

    let answer = get(stack.http, &webfinger("acct:alice@kez.test")).await;
    assert_jrd_headers(&answer);
    assert_eq!(answer.json(), expected_jrd(&alice, None));

    // The registry's normalisation, the scheme's case and percent-encoding anywhere.
    for resource in [
        "acct:Alice@KEZ.test",
        "ACCT:alice@kez.test",
        "acct:alice%40kez.test",
        "acct%3Aalice%40kez.test",
        "%61cct:%41lice@kez.test",
        "acct:%61lice@kez.test",
        // Percent-encoded inside the acct: URI as well (decoded twice).
        "acct:%2561lice@kez.test",
    ] {
        let answer = get(stack.http, &webfinger(resource)).await;
        assert_jrd_headers(&answer);
        assert_eq!(answer.json(), expected_jrd(&alice, None), "{resource}");
    }
    // Parameters in any order, unknown ones ignored.
    let answer = get(
        stack.http,
        &format!("{WEBFINGER}?x=1&resource=acct:alice@kez.test&&y"),
    )
    .await;
    assert_eq!(answer.json(), expected_jrd(&alice, None));

    // Once alice has a sigchain, the JRD carries its head.
    let first = UnsignedLink::first(alice.public_key(), now(), nats_endpoint("nats"))
        .sign(&alice)
        .unwrap();
    call(&stack.client, "kez.sigchain.append", first.bytes().to_vec())
        .await
        .unwrap();
    let answer = get(stack.http, &webfinger("acct:alice@kez.test")).await;
    assert_jrd_headers(&answer);
    let jrd = answer.json();
    assert_eq!(
        jrd,
        expected_jrd(&alice, Some((1, first.hash().to_string())))
    );

    // HEAD: the same headers, no body.
    let head = request(stack.http, "HEAD", &webfinger("acct:alice@kez.test")).await;
    assert_jrd_headers(&head);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(answer.body.len().to_string().as_str())
    );
    let head = request(stack.http, "HEAD", &webfinger("acct:nobody@kez.test")).await;
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert_eq!(head.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn rel_selects_links_and_keeps_the_rest() {
    let stack = stack().await;
    let alice = register(&stack.client, "alice").await;
    let full = expected_jrd(&alice, None);
    let with_links = |links: Vec<Value>| {
        let mut jrd = full.clone();
        jrd["links"] = Value::Array(links);
        jrd
    };
    let nats_link = full["links"][0].clone();
    let sigchain_link = full["links"][1].clone();
    let base = webfinger("acct:alice@kez.test");
    let cases = [
        (format!("rel={REL_NATS}"), vec![nats_link.clone()]),
        (
            "rel=https%3A%2F%2Fkez.lat%2Fns%2Frel%2Fsigchain".to_owned(),
            vec![sigchain_link.clone()],
        ),
        (
            format!("rel={REL_SIGCHAIN}&rel={REL_NATS}"),
            vec![nats_link.clone(), sigchain_link.clone()],
        ),
        (
            format!("rel={REL_NATS}&rel={REL_NATS}"),
            vec![nats_link.clone()],
        ),
        (
            "rel=http://webfinger.net/rel/profile-page".to_owned(),
            vec![],
        ),
        (
            format!("rel=self&rel={REL_SIGCHAIN}"),
            vec![sigchain_link.clone()],
        ),
        ("rel=".to_owned(), vec![]),
    ];
    for (rels, links) in cases {
        let answer = get(stack.http, &format!("{base}&{rels}")).await;
        assert_jrd_headers(&answer);
        assert_eq!(answer.json(), with_links(links), "{rels}");
    }
    // rel before resource works the same.
    let answer = get(
        stack.http,
        &format!("{WEBFINGER}?rel={REL_NATS}&resource=acct:alice@kez.test"),
    )
    .await;
    assert_eq!(answer.json(), with_links(vec![nats_link]));
}

#[tokio::test]
async fn bad_resources_are_400() {
    let stack = stack().await;
    register(&stack.client, "alice").await;
    let targets = [
        WEBFINGER.to_owned(),
        format!("{WEBFINGER}?"),
        format!("{WEBFINGER}?rel={REL_NATS}"),
        format!("{WEBFINGER}?resource="),
        format!("{WEBFINGER}?resource"),
        format!("{WEBFINGER}?resource=acct:alice@kez.test&resource=acct:alice@kez.test"),
        format!("{WEBFINGER}?resource=acct:alice@kez.test&resource=acct:bob@kez.test"),
        format!("{WEBFINGER}?resource=acct:alice@kez.test&resourc%65=x"),
        webfinger("alice@kez.test"),
        webfinger("@alice@kez.test"),
        webfinger("https://kez.test/@alice"),
        webfinger("mailto:alice@kez.test"),
        webfinger("acct:alice"),
        webfinger("acct:@kez.test"),
        webfinger("acct:alice@"),
        webfinger("acct:alice@bob@kez.test"),
        webfinger("acct:alice%20@kez.test"),
        webfinger("acct:alice@kez.test/path"),
        // Bad percent-encoding, at either level, and bytes that are not UTF-8.
        webfinger("acct:alice%4"),
        webfinger("acct:alice%zz@kez.test"),
        webfinger("acct:alice%2540kez.test"),
        webfinger("acct:al%FFice@kez.test"),
        webfinger("acct%3"),
        format!("{WEBFINGER}?resource=acct:alice@kez.test&rel=%"),
    ];
    for target in targets {
        let answer = get(stack.http, &target).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{target}: {}",
            answer.text()
        );
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert!(!answer.text().is_empty());
    }
}

#[tokio::test]
async fn unknown_handles_and_other_domains_are_404() {
    let stack = stack().await;
    register(&stack.client, "alice").await;
    for resource in [
        "acct:bob@kez.test",
        "acct:alice@kez.lat",
        "acct:alice@example.org",
        "acct:alice@kez.test.",
        "acct:alice@127.0.0.1",
        "acct:alice@[::1]",
        // Names no handle can have (PROTOCOL.md §2) name no account here.
        "acct:admin@kez.test",
        "acct:a@kez.test",
        "acct:1alice@kez.test",
        "acct:al.ice@kez.test",
        "acct:%2540alice@kez.test",
    ] {
        let answer = get(stack.http, &webfinger(resource)).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{resource}: {}",
            answer.text()
        );
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    }
}

#[tokio::test]
async fn other_methods_are_405_and_other_paths_404() {
    let stack = stack().await;
    register(&stack.client, "alice").await;
    let target = webfinger("acct:alice@kez.test");
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "KEZ"] {
        let answer = request(stack.http, method, &target).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.header("allow"), Some("GET, HEAD"), "{method}");
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    }
    for path in ["/healthz", "/metrics"] {
        let answer = request(stack.http, "POST", path).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(answer.header("allow"), Some("GET, HEAD"));
        // CORS is for WebFinger only.
        assert_eq!(answer.header("access-control-allow-origin"), None);
    }
    for path in [
        "/",
        "/.well-known/webfinger/",
        "/.well-known/WEBFINGER?resource=acct:alice@kez.test",
        "/.well-known/host-meta",
        "/%2Ewell-known/webfinger?resource=acct:alice@kez.test",
        "/healthz/x",
        "/metrics.txt",
    ] {
        let answer = get(stack.http, path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer.header("access-control-allow-origin"), None);
        let answer = request(stack.http, "DELETE", path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "DELETE {path}");
    }
}

#[tokio::test]
async fn metrics_count_nats_requests_and_http_answers() {
    let stack = stack().await;
    register(&stack.client, "alice").await;
    call_ok(
        &stack.client,
        "kez.registry.lookup",
        json!({"handle": "alice"}),
    )
    .await;
    call(
        &stack.client,
        "kez.registry.lookup",
        serde_json::to_vec(&json!({"handle": "nobody"})).unwrap(),
    )
    .await
    .unwrap_err();
    for _ in 0..3 {
        assert_eq!(
            get(stack.http, &webfinger("acct:alice@kez.test"))
                .await
                .status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(stack.http, &webfinger("acct:bob@kez.test"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(stack.http, WEBFINGER).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(get(stack.http, "/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(stack.http, "/healthz").await.status, StatusCode::OK);

    let answer = get(stack.http, "/metrics").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = answer.text();
    for line in [
        "kez_requests_total{endpoint=\"kez.registry.register\"} 1",
        "kez_requests_total{endpoint=\"kez.registry.lookup\"} 2",
        "kez_requests_total{endpoint=\"kez.sigchain.append\"} 0",
        "kez_request_errors_total{endpoint=\"kez.registry.lookup\",code=\"404\"} 1",
        "kez_request_duration_seconds_count{endpoint=\"kez.registry.lookup\"} 2",
        "kez_callout_decisions_total{decision=\"denied\"} 0",
        "kez_http_requests_total{endpoint=\"webfinger\",status=\"200\"} 3",
        "kez_http_requests_total{endpoint=\"webfinger\",status=\"404\"} 1",
        "kez_http_requests_total{endpoint=\"webfinger\",status=\"400\"} 1",
        "kez_http_requests_total{endpoint=\"other\",status=\"404\"} 1",
        "kez_http_requests_total{endpoint=\"healthz\",status=\"200\"} 1",
        "# TYPE kez_request_duration_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    // This scrape is counted once it is answered.
    let again = get(stack.http, "/metrics").await;
    assert!(
        again
            .text()
            .contains("kez_http_requests_total{endpoint=\"metrics\",status=\"200\"} 1")
    );
    let head = request(stack.http, "HEAD", "/metrics").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn healthz_is_503_without_the_broker() {
    let stack = stack().await;
    let answer = get(stack.http, "/healthz").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok\n");
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        request(stack.http, "HEAD", "/healthz").await.status,
        StatusCode::OK
    );

    let Stack {
        nats, server, http, ..
    } = stack;
    drop(nats);
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer = get(http, "/healthz").await;
        if answer.status != StatusCode::OK || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!answer.text().is_empty());
    // The rest of the shim still answers, and says so in the metrics.
    let metrics = get(http, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .text()
            .contains("kez_http_requests_total{endpoint=\"healthz\",status=\"503\"} 1")
    );
    let answer = get(http, &webfinger("acct:alice@kez.test")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    // Stopping does not wait for the broker that is gone.
    server.stop().await;
}

/// A server started while its broker is down answers at once: `/healthz` 503 with why it does
/// not serve yet, WebFinger 503; once the broker is up it serves. (It once bound the port and
/// answered nothing: a `curl` hung for ten minutes.)
#[tokio::test]
async fn healthz_says_why_while_the_server_waits_for_the_broker() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    nats.stop();
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let starting = tokio::spawn({
        let url = url.clone();
        async move {
            KezServer::start_with(&ServerConfig {
                http_listen: Some(http),
                ..ServerConfig::new(&url, TEST_DOMAIN)
            })
            .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(http).await.is_err() {
        assert!(Instant::now() < deadline, "the shim did not bind {http}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = get(http, "/healthz").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let said = answer.text();
    assert!(
        said.starts_with(&format!(
            "starting: cannot connect to the broker at {url}: "
        )),
        "{said}"
    );
    let answer = get(http, &webfinger("acct:alice@kez.test")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    assert_eq!(get(http, "/other").await.status, StatusCode::NOT_FOUND);

    nats.resume();
    let server = starting.await.unwrap();
    let answer = get(http, "/healthz").await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (StatusCode::OK, "ok\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn hostile_connections_are_cut_off_and_the_server_keeps_serving() {
    let stack = stack_with(HttpLimits {
        header_read_timeout: Duration::from_secs(1),
        ..HttpLimits::default()
    })
    .await;
    register(&stack.client, "alice").await;

    // A request target over 2 KiB: 414.
    let long = format!(
        "{}&pad={}",
        webfinger("acct:alice@kez.test"),
        "a".repeat(3000)
    );
    let answer = get(stack.http, &long).await;
    assert_eq!(answer.status, StatusCode::URI_TOO_LONG);
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));

    // A head over 8 KiB (a long target, or long headers, or too many): 431, connection closed.
    let huge_target = format!(
        "GET /{} HTTP/1.1\r\nHost: kez.test\r\n\r\n",
        "a".repeat(9000)
    );
    let huge_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: kez.test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: kez.test\r\n{}\r\n",
        (0..100)
            .map(|i| format!("X-H{i}: 1\r\n"))
            .collect::<String>()
    );
    for request in [huge_target, huge_header, many_headers] {
        let (answer, _) = raw(stack.http, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 431 "),
            "{:?}",
            &answer[..answer.len().min(200)]
        );
    }

    // Garbage and broken requests: 400, connection closed.
    for garbage in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost kez.test\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: kez.test\r\nContent-Length: x\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: kez.test\r\n\r\n",
    ] {
        let (answer, _) = raw(stack.http, garbage).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{:?} -> {answer:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    // Raw non-ASCII in the query (hyper lets it through) is no acct: URI.
    let (answer, _) = raw(
        stack.http,
        "GET /.well-known/webfinger?resource=acct:\u{430}lice@kez.test HTTP/1.1\r\nHost: kez.test\r\n\r\n".as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

    // Slow loris: a head that never ends is cut off after the header read timeout, unanswered.
    let (answer, took) = raw(stack.http, b"GET /healthz HTTP/1.1\r\nHost: kez.test\r\n").await;
    assert_eq!(answer, "");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // And a kept-alive connection that sends no next request.
    let (answer, took) = raw(
        stack.http,
        b"GET /healthz HTTP/1.1\r\nHost: kez.test\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // And so is a connection that sends nothing at all.
    let (answer, took) = raw(stack.http, b"").await;
    assert_eq!(answer, "");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Through all of it the server kept serving.
    let answer = get(stack.http, &webfinger("acct:alice@kez.test")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let metrics = get(stack.http, "/metrics").await;
    for line in [
        "kez_http_requests_total{endpoint=\"webfinger\",status=\"414\"} 1",
        "kez_http_requests_total{endpoint=\"webfinger\",status=\"400\"} 1",
        "kez_http_requests_total{endpoint=\"other\",status=\"431\"} 3",
        "kez_http_requests_total{endpoint=\"other\",status=\"400\"} 6",
    ] {
        assert!(metrics.text().contains(line), "{line}:\n{}", metrics.text());
    }
    stack.server.stop().await;
}

#[tokio::test]
async fn connections_are_bounded() {
    let stack = stack_with(HttpLimits {
        max_connections: 2,
        ..HttpLimits::default()
    })
    .await;
    let idle_one = TcpStream::connect(stack.http).await.unwrap();
    let idle_two = TcpStream::connect(stack.http).await.unwrap();
    // Both permits are taken: a third connection waits in the backlog, unanswered.
    let waiting = tokio::spawn(get(stack.http, "/healthz"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third connection was served");
    drop(idle_one);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    drop(idle_two);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let stack = stack().await;
    register(&stack.client, "alice").await;
    let stream = TcpStream::connect(stack.http).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    for target in [
        webfinger("acct:alice@kez.test"),
        webfinger("acct:bob@kez.test"),
        "/healthz".to_owned(),
    ] {
        let request = Request::get(target.as_str())
            .header("host", HeaderValue::from_static("kez.test"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert!(response.status() == StatusCode::OK || response.status() == StatusCode::NOT_FOUND);
        response.into_body().collect().await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_closes_the_listener_and_the_shim_is_off_by_default() {
    let stack = stack().await;
    assert_eq!(get(stack.http, "/healthz").await.status, StatusCode::OK);
    // A connection that sent nothing does not hold up the shutdown.
    let _idle = TcpStream::connect(stack.http).await.unwrap();
    let started = Instant::now();
    stack.server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(TcpStream::connect(stack.http).await.is_err());

    let plain = KezServer::start(&stack.nats.url()).await;
    assert_eq!(plain.http_addr(), None);
    plain.stop().await;
}
