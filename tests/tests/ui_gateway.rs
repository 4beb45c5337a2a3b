//! The `kez-chat ui` gateway (issue 23, PROTOCOL.md §13) against hostile requests,
//! with no browser: a registered home on a real stack, its gateway, and requests that a page of
//! another site (or another local program) could make. Well-formed requests go through hyper's
//! HTTP/1.1 client; WebSocket upgrades and frames through a raw TCP socket.
//!
//! What must hold: only `/TOKEN/…` with `Host: 127.0.0.1:PORT` / `localhost:PORT` gets in (so a
//! DNS-rebound name cannot); a POST or WebSocket needs the page's own `Origin`; every answer
//! carries the strict CSP; the token is in no log; the WebSocket runs only the allowed commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::StatusCode;
use kez_tests::browser::Gateway;
use kez_tests::callout::CalloutProcessStack;
use kez_tests::http::{self, Answer};
use kez_tests::person::Person;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A registered alice on a real stack, and her gateway.
struct Setup {
    // Declared in the order they stop: the gateway, then the home (its service stops with
    // it), then the stack.
    gateway: Gateway,
    alice: Person,
    stack: CalloutProcessStack,
}

impl Setup {
    async fn start() -> Setup {
        let stack = CalloutProcessStack::start().await;
        let alice = Person::new();
        alice.register(&stack.nats.url(), "alice").await;
        // No --server: a registered home's gateway uses the home's.
        let gateway = Gateway::start(&alice.home, None).await;
        Setup {
            gateway,
            alice,
            stack,
        }
    }

    fn port(&self) -> u16 {
        self.gateway.port()
    }

    fn token(&self) -> &str {
        self.gateway.token()
    }

    /// `127.0.0.1:PORT`: the Host the page's own requests carry.
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// `http://127.0.0.1:PORT`: the Origin of the page's own requests.
    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// Stops the gateway (it must exit on SIGTERM by itself) and the home's service.
    async fn stop(mut self) {
        let status = self.gateway.stop();
        {
            use std::os::unix::process::ExitStatusExt;
            assert_ne!(
                status.signal(),
                Some(9),
                "the gateway did not exit within 10 s of SIGTERM; stderr:\n{}",
                self.gateway.stderr()
            );
        }
        self.alice.stop_service().await;
        drop(self.stack);
    }
}

/// One request to the gateway on `port`.
async fn send(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    http::request(([127, 0, 0, 1], port).into(), method, target, headers, body).await
}

/// A GET with `Host: host` and no Origin (a top-level navigation).
async fn get_as(port: u16, target: &str, host: &str) -> Answer {
    send(port, "GET", target, &[("host", host)], b"").await
}

/// Asserts a 403 with a JSON error body and the same security headers as any answer.
fn assert_refused(answer: &Answer, port: u16, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::FORBIDDEN,
        "{what}: expected 403, got {} {:?}",
        answer.status,
        answer.text()
    );
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
        panic!(
            "{what}: the 403 body is not JSON ({e}): {:?}",
            answer.text()
        )
    });
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{what}: the 403 body is not {{\"error\":{{\"code\":…,\"message\":…}}}}: {body}"
    );
    assert_security_headers(answer, port, what);
}

/// The CSP and the other headers every answer carries (the contract's "Every response").
fn assert_security_headers(answer: &Answer, port: u16, what: &str) {
    let csp = answer
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy header"));
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval") && !csp.contains('*'),
        "{what}: the CSP allows inline code, eval or any source: {csp}"
    );
    let directive = |name: &str| -> Vec<&str> {
        csp.split(';')
            .map(str::trim)
            .find_map(|d| {
                d.strip_prefix(name)
                    .filter(|rest| rest.is_empty() || rest.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("{what}: the CSP has no {name}: {csp}"))
            .split_whitespace()
            .collect()
    };
    assert_eq!(directive("default-src"), ["'none'"], "{what}: {csp}");
    assert_eq!(directive("script-src"), ["'self'"], "{what}: {csp}");
    assert_eq!(directive("style-src"), ["'self'"], "{what}: {csp}");
    assert_eq!(directive("base-uri"), ["'none'"], "{what}: {csp}");
    assert_eq!(directive("form-action"), ["'none'"], "{what}: {csp}");
    assert_eq!(directive("frame-ancestors"), ["'none'"], "{what}: {csp}");
    let own_ws = [
        format!("ws://127.0.0.1:{port}"),
        format!("ws://localhost:{port}"),
    ];
    for source in directive("connect-src") {
        assert!(
            source == "'self'" || own_ws.iter().any(|own| source == own),
            "{what}: connect-src allows {source}, not only the page itself: {csp}"
        );
    }
    for source in directive("img-src") {
        assert!(
            ["'self'", "blob:", "data:"].contains(&source),
            "{what}: img-src allows {source}: {csp}"
        );
    }
    assert_eq!(
        answer.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(
        answer.header("referrer-policy"),
        Some("no-referrer"),
        "{what}"
    );
    assert!(
        answer
            .header("cache-control")
            .is_some_and(|v| v.contains("no-store")),
        "{what}: Cache-Control is {:?}, not no-store",
        answer.header("cache-control")
    );
}

/// `token` with its first character changed (same length, still base64url).
fn other_token(token: &str) -> String {
    let first = if token.starts_with('A') { 'B' } else { 'A' };
    format!("{first}{}", &token[1..])
}

/// The `*.log` files in `home` (the service's log and any other), with their text.
fn logs_in(home: &Path) -> Vec<(PathBuf, String)> {
    let mut logs = Vec::new();
    let mut stack = vec![home.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "log") {
                let text =
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
                logs.push((path, text));
            }
        }
    }
    logs
}

/// Files under `dir` whose bytes are exactly `content`, with their modes.
fn files_holding(dir: &Path, content: &[u8]) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                stack.push(path);
            } else if metadata.is_file()
                && metadata.len() == content.len() as u64
                && std::fs::read(&path).is_ok_and(|bytes| bytes == content)
            {
                found.push((path, metadata.permissions().mode() & 0o777));
            }
        }
    }
    found
}

#[tokio::test]
async fn only_the_token_and_the_pages_own_host_get_in() {
    let setup = Setup::start().await;
    let port = setup.port();
    let token = setup.token().to_owned();
    let host = setup.host();
    let index = format!("/{token}/");

    // The page itself, under both names the gateway answers to.
    let page = get_as(port, &index, &host).await;
    assert_eq!(page.status, StatusCode::OK, "GET {index}: {}", page.text());
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "index.html is {:?}",
        page.header("content-type")
    );
    assert_security_headers(&page, port, "GET /TOKEN/");
    let html = page.text();
    assert!(
        !html.contains("<script>") && !html.contains("style=\""),
        "index.html has inline script or style attributes:\n{html}"
    );
    let localhost = get_as(port, &index, &format!("localhost:{port}")).await;
    assert_eq!(localhost.status, StatusCode::OK, "Host localhost:PORT");
    // A module the page loads: served as JavaScript (nosniff refuses anything else).
    if let Some(src) = html
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .filter(|src| src.ends_with(".js"))
    {
        let src = src.trim_start_matches("./");
        assert!(
            !src.starts_with('/') && !src.contains("://"),
            "index.html loads {src}: not relative, so it does not carry the token"
        );
        let script = get_as(port, &format!("/{token}/{src}"), &host).await;
        assert_eq!(script.status, StatusCode::OK, "GET /TOKEN/{src}");
        assert!(
            script
                .header("content-type")
                .is_some_and(|t| t.contains("javascript")),
            "{src} is served as {:?}",
            script.header("content-type")
        );
        assert_security_headers(&script, port, &format!("GET /TOKEN/{src}"));
    }

    // Bound to 127.0.0.1 only: not to every address (127.0.0.2 is loopback too, so a socket on
    // 0.0.0.0 would answer there).
    assert!(
        TcpStream::connect(("127.0.0.2", port)).await.is_err(),
        "the gateway answers on 127.0.0.2:{port}: it listens on more than 127.0.0.1"
    );

    // The address without its last slash leads to the page; a wrong one leads nowhere.
    let moved = get_as(port, &format!("/{token}"), &host).await;
    assert_eq!(moved.status, StatusCode::PERMANENT_REDIRECT, "GET /TOKEN");
    assert_eq!(moved.header("location"), Some(index.as_str()), "GET /TOKEN");
    assert_security_headers(&moved, port, "GET /TOKEN");

    // No token, a wrong one, a token somewhere else than the first segment.
    let wrong = other_token(&token);
    for target in [
        "/".to_owned(),
        "/index.html".to_owned(),
        "/favicon.ico".to_owned(),
        "/ws".to_owned(),
        format!("/{wrong}/"),
        format!("/{wrong}"),
        format!("/{wrong}/index.html"),
        format!("/{}/", &token[..42]),
        format!("/{token}A/"),
        format!("/x/{token}/"),
        format!("/?token={token}"),
    ] {
        let answer = get_as(port, &target, &host).await;
        assert_refused(&answer, port, &format!("GET {target}"));
        assert!(
            !answer.text().contains(&token),
            "GET {target}: the refusal shows the token: {}",
            answer.text()
        );
    }

    // The right token under another name: DNS rebinding (evil.example resolving to 127.0.0.1)
    // or another port.
    for bad_host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        "127.0.0.1".to_owned(),
        format!("[::1]:{port}"),
        format!("0.0.0.0:{port}"),
    ] {
        let answer = get_as(port, &index, &bad_host).await;
        assert_refused(&answer, port, &format!("GET /TOKEN/ with Host {bad_host}"));
        assert!(
            !answer.text().contains("<html") && !answer.text().contains(&token),
            "Host {bad_host}: the refusal shows the page or the token"
        );
    }
    // No Host at all.
    let answer = send(port, "GET", &index, &[], b"").await;
    assert!(
        !answer.status.is_success(),
        "GET /TOKEN/ without a Host: {} {}",
        answer.status,
        answer.text()
    );

    // The right token and Host, from another site's page.
    for origin in ["http://evil.example", "null"] {
        let answer = send(
            port,
            "GET",
            &index,
            &[("host", &host), ("origin", origin)],
            b"",
        )
        .await;
        assert_refused(&answer, port, &format!("GET /TOKEN/ with Origin {origin}"));
    }

    // Out of the static files: traversal in every spelling; an unknown download.
    for target in [
        format!("/{token}/../../../../../../etc/passwd"),
        format!("/{token}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
        format!("/{token}/..%2f..%2f..%2f..%2fetc%2fpasswd"),
        format!("/{token}/%2e%2e%2f%2e%2e%2fCargo.toml"),
        format!("/{token}/....//....//Cargo.toml"),
        format!("/{token}/download/d-00"),
        format!("/{token}/download/../../Cargo.toml"),
        format!("/{token}/upload"),
    ] {
        let answer = get_as(port, &target, &host).await;
        let text = answer.text();
        assert!(
            !answer.status.is_success() && !text.contains("root:") && !text.contains("[package]"),
            "GET {target}: {} {text}",
            answer.status
        );
    }

    // The token appears only in the one URL line on stdout: in no line of stderr, and in no
    // log of the home, even after all the refused requests above named it.
    let stdout = setup.gateway.stdout();
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(&token)).collect();
    assert_eq!(
        lines,
        [format!("{{\"url\":\"{}\"}}", setup.gateway.url())],
        "stdout holds the token elsewhere than the URL line:\n{stdout}"
    );
    let stderr = setup.gateway.stderr();
    assert!(
        !stderr.contains(&token),
        "the gateway's stderr shows the token:\n{stderr}"
    );
    for (path, text) in logs_in(&setup.alice.home) {
        assert!(
            !text.contains(&token),
            "{} shows the token:\n{text}",
            path.display()
        );
    }
    setup.stop().await;
}

#[tokio::test]
async fn uploads_come_only_from_the_pages_own_origin() {
    let setup = Setup::start().await;
    let port = setup.port();
    let token = setup.token().to_owned();
    let host = setup.host();
    let origin = setup.origin();
    let upload = format!("/{token}/upload?name=note.txt");
    let octets = ("content-type", "application/octet-stream");

    let refused: Vec<(String, Vec<(&str, String)>)> = vec![
        (
            "a foreign Origin".into(),
            vec![
                ("host", host.clone()),
                ("origin", "http://evil.example".into()),
            ],
        ),
        (
            "a foreign Origin on the gateway's port".into(),
            vec![
                ("host", host.clone()),
                ("origin", format!("http://evil.example:{port}")),
            ],
        ),
        (
            "an Origin that starts like the page's".into(),
            vec![
                ("host", host.clone()),
                ("origin", format!("http://127.0.0.1:{port}.evil.example")),
            ],
        ),
        (
            "https on the page's host".into(),
            vec![
                ("host", host.clone()),
                ("origin", format!("https://127.0.0.1:{port}")),
            ],
        ),
        (
            "another port".into(),
            vec![
                ("host", host.clone()),
                (
                    "origin",
                    format!("http://127.0.0.1:{}", port.wrapping_add(1)),
                ),
            ],
        ),
        (
            "Origin null (a sandboxed frame or a file: page)".into(),
            vec![("host", host.clone()), ("origin", "null".into())],
        ),
        ("no Origin".into(), vec![("host", host.clone())]),
        (
            "a foreign Host with the page's Origin".into(),
            vec![
                ("host", format!("evil.example:{port}")),
                ("origin", origin.clone()),
            ],
        ),
    ];
    for (n, (what, headers)) in refused.iter().enumerate() {
        let body = format!("kez-ui-refused-upload-{n}-{token}").into_bytes();
        let mut all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.push(octets);
        let answer = send(port, "POST", &upload, &all, &body).await;
        assert_refused(&answer, port, &format!("POST /TOKEN/upload with {what}"));
        let staged = files_holding(&setup.alice.home, &body);
        assert!(
            staged.is_empty(),
            "the refused upload ({what}) was staged anyway: {staged:?}"
        );
    }
    // A wrong token with the page's Origin.
    let answer = send(
        port,
        "POST",
        &format!("/{}/upload?name=note.txt", other_token(&token)),
        &[("host", &host), ("origin", &origin), octets],
        b"wrong token",
    )
    .await;
    assert_refused(&answer, port, "POST /WRONG/upload");

    // The page's own upload is staged in the home, readable by its owner only.
    for (page_host, page_origin) in [
        (host.clone(), origin.clone()),
        (
            format!("localhost:{port}"),
            format!("http://localhost:{port}"),
        ),
    ] {
        let body = format!("kez-ui-upload-from-{page_origin}").into_bytes();
        let answer = send(
            port,
            "POST",
            &upload,
            &[("host", &page_host), ("origin", &page_origin), octets],
            &body,
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "POST /TOKEN/upload from {page_origin}: {}",
            answer.text()
        );
        assert_security_headers(&answer, port, "POST /TOKEN/upload");
        let json: Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|e| panic!("upload answer is not JSON ({e}): {}", answer.text()));
        let id = json["upload"].as_str().unwrap_or("");
        assert!(
            id.strip_prefix("u-")
                .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())),
            "upload answer {json}: not {{\"upload\":\"u-<hex>\"}}"
        );
        let staged = files_holding(&setup.alice.home, &body);
        assert_eq!(
            staged.len(),
            1,
            "the upload from {page_origin} is not staged once in the home: {staged:?}"
        );
        assert_eq!(
            staged[0].1,
            0o600,
            "{} has mode {:o}, not 0600",
            staged[0].0.display(),
            staged[0].1
        );
    }
    setup.stop().await;
}

/// The key of RFC 6455 §1.3 and the accept value it must get.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends a WebSocket upgrade for `target` and reads the answer's head; answers the status
/// code, the head and the connection (positioned after the head).
async fn ws_upgrade(
    port: u16,
    target: &str,
    host: &str,
    origin: Option<&str>,
) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(origin) = origin {
        request.push_str(&format!("Origin: {origin}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(_) => break,
            Err(_) => panic!("upgrade of {target} (Origin {origin:?}): no answer within 20 s"),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, head, stream)
}

/// Sends one masked text frame.
async fn ws_send(stream: &mut TcpStream, text: &str) {
    let payload = text.as_bytes();
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81u8];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).await.unwrap();
}

/// Reads the next text message (joining fragments, skipping pings and pongs) as JSON; panics
/// on a close or after 30 s.
async fn ws_next(stream: &mut TcpStream) -> Value {
    ws_next_within(stream, Duration::from_secs(30))
        .await
        .expect("a WebSocket message within 30 s")
}

/// [`ws_next`], or `None` when no message came within `within`.
async fn ws_next_within(stream: &mut TcpStream, within: Duration) -> Option<Value> {
    tokio::time::timeout(within, async {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.expect("a frame");
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0f;
            let masked = head[1] & 0x80 != 0;
            let len = match head[1] & 0x7f {
                126 => u64::from(stream.read_u16().await.unwrap()),
                127 => stream.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if masked {
                stream.read_exact(&mut mask).await.unwrap();
            }
            let mut payload = vec![0u8; usize::try_from(len).unwrap()];
            stream.read_exact(&mut payload).await.unwrap();
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x8 => panic!(
                    "the gateway closed the WebSocket: {:?}",
                    String::from_utf8_lossy(&payload)
                ),
                0x9 | 0xa => continue,
                _ => message.extend_from_slice(&payload),
            }
            if fin {
                return serde_json::from_slice(&message).unwrap_or_else(|e| {
                    panic!(
                        "a message that is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&message)
                    )
                });
            }
        }
    })
    .await
    .ok()
}

/// Runs `args` over the socket as run `id`; answers the frames of that run (messages of other
/// runs are skipped) and whether it ended (its last frame is `exit` or `refused`). A run that
/// has not ended within 15 s is cancelled.
async fn ws_run(stream: &mut TcpStream, id: u64, args: Value) -> (Vec<Value>, bool) {
    ws_send(stream, &json!({"id": id, "run": args}).to_string()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(message) = ws_next_within(stream, left).await else {
            ws_send(stream, &json!({"id": id, "cancel": true}).to_string()).await;
            return (frames, false);
        };
        // A message the gateway cannot take gets an error of its own, without an id.
        if message.get("error").is_some() && message.get("id").is_none() {
            frames.push(message);
            return (frames, true);
        }
        if message["id"] != id {
            continue;
        }
        let done =
            message["frame"].get("exit").is_some() || message["frame"].get("refused").is_some();
        frames.push(message);
        if done {
            return (frames, true);
        }
    }
}

#[tokio::test]
async fn the_websocket_opens_only_for_the_pages_own_origin_and_runs_only_allowed_commands() {
    let setup = Setup::start().await;
    let port = setup.port();
    let token = setup.token().to_owned();
    let host = setup.host();
    let origin = setup.origin();
    let ws = format!("/{token}/ws");

    let evil_port_origin = format!("http://evil.example:{port}");
    let lookalike = format!("http://127.0.0.1:{port}.evil.example");
    let evil_host = format!("evil.example:{port}");
    let wrong_ws = format!("/{}/ws", other_token(&token));
    for (what, target, host, origin) in [
        ("a foreign Origin", &ws, &host, Some("http://evil.example")),
        (
            "a foreign Origin on the gateway's port",
            &ws,
            &host,
            Some(evil_port_origin.as_str()),
        ),
        (
            "an Origin that starts like the page's",
            &ws,
            &host,
            Some(lookalike.as_str()),
        ),
        ("Origin null", &ws, &host, Some("null")),
        ("no Origin", &ws, &host, None),
        ("a foreign Host", &ws, &evil_host, Some(origin.as_str())),
        ("a wrong token", &wrong_ws, &host, Some(origin.as_str())),
    ] {
        let (status, head, _) = ws_upgrade(port, target, host, origin).await;
        assert_ne!(status, 101, "the WebSocket opened for {what}:\n{head}");
        assert_eq!(status, 403, "the upgrade with {what}:\n{head}");
    }

    // The page's own socket.
    let (status, head, mut socket) = ws_upgrade(port, &ws, &host, Some(&origin)).await;
    assert_eq!(status, 101, "the page's own upgrade:\n{head}");
    assert!(
        head.lines()
            .any(|line| line.split_once(':').is_some_and(|(name, value)| name
                .eq_ignore_ascii_case("sec-websocket-accept")
                && value.trim() == WS_ACCEPT)),
        "no Sec-WebSocket-Accept: {WS_ACCEPT}:\n{head}"
    );
    let hello = ws_next(&mut socket).await;
    assert_eq!(hello["hello"]["registered"], true, "{hello}");
    assert_eq!(hello["hello"]["handle"], "@alice@kez.test", "{hello}");

    // What the page may not make the CLI do: another home or server, plaintext, the service,
    // a second registration, a file of the disk instead of an upload, a download to a path.
    let mut id = 0;
    let mut not_refused = Vec::new();
    for args in [
        json!(["--home", "/tmp", "whoami"]),
        json!(["whoami", "--home", "/tmp"]),
        json!(["whoami", "--home=/tmp"]),
        json!(["--server", "nats://127.0.0.1:1", "whoami"]),
        json!(["whoami", "--server=nats://127.0.0.1:1"]),
        json!(["--allow-plaintext", "whoami"]),
        json!(["service", "stop"]),
        json!(["register", "mallory", "--no-paper-key"]),
        json!(["recover", "@alice"]),
        json!(["device", "join", "x"]),
        json!(["share", "@alice", "/etc/passwd"]),
        json!(["share", "@alice", "--", "/etc/passwd"]),
        json!(["publish", "/etc/passwd", "--public"]),
        json!(["publish", "--", "/etc/passwd"]),
        json!(["name", "Alice", "--avatar", "/etc/passwd"]),
        json!(["download", "abcdef", "--out", "/tmp/kez-ui-stolen"]),
        json!(["download", "abcdef", "--out=/tmp/kez-ui-stolen"]),
        json!([]),
        json!("whoami"),
    ] {
        id += 1;
        let (frames, ended) = ws_run(&mut socket, id, args.clone()).await;
        let code = frames.last().map_or("", |last| {
            last["frame"]["refused"]["code"]
                .as_str()
                .or(last["error"]["code"].as_str())
                .unwrap_or("")
        });
        // What makes a home may reach the CLI in a registered one (PROTOCOL.md §13 lists them
        // without a condition), which refuses it without touching the home.
        let makes_home = matches!(args[0].as_str(), Some("register" | "recover"));
        let cli_refused_it = frames.last().is_some_and(|last| {
            last["frame"]["exit"]["code"] == 4
                && last["frame"]["exit"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("already"))
        });
        if makes_home && cli_refused_it {
            continue;
        }
        if !["not_allowed", "malformed", "unregistered"].contains(&code) {
            let said: Vec<String> = frames.iter().map(|f| f["frame"].to_string()).collect();
            let still = if ended {
                ""
            } else {
                " (still running after 15 s)"
            };
            not_refused.push(format!("{args}: {}{still}", said.join(" ")));
        }
    }
    assert!(
        not_refused.is_empty(),
        "the gateway did not refuse these runs (the CLI ran them):\n  {}",
        not_refused.join("\n  ")
    );

    // The socket still works, and the service still runs.
    id += 1;
    let (frames, _) = ws_run(&mut socket, id, json!(["whoami", "--json"])).await;
    let last = &frames.last().unwrap()["frame"];
    assert_eq!(last["exit"]["code"], 0, "whoami --json: {frames:#?}");
    let out: String = frames
        .iter()
        .filter_map(|f| f["frame"]["out"].as_str())
        .collect();
    assert!(out.contains("alice"), "whoami --json said {out:?}");
    drop(socket);
    setup.stop().await;
}
