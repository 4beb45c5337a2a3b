//! `kez-chat ui`: the web UI's gateway. It serves the front end (`kez-chat/ui/`, embedded) on
//! 127.0.0.1 and relays the browser's commands to the home's service over the local API
//! (PROTOCOL.md §12, §13): the browser is a client of the service exactly as the CLI is, and
//! runs the same commands. Only `register` runs here, in a home that has no service yet.
//!
//! Every request must name the run's token as its first path segment, come with this
//! listener's own `Host` (DNS rebinding) and, if it has one, its own `Origin` (a POST and the
//! WebSocket must have one: cross-site requests and WebSocket hijacking). What the browser may
//! run is checked here: a list of commands, no home or server flags, files only from uploads
//! and downloads only into the gateway's stage, from which the browser saves them where the
//! person chooses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kez_client::Home;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::failure::{Failure, RUNTIME, USAGE};
use crate::local::{ClientFrame, Frame, Request as LocalRequest};
use crate::service::{self, Held};
use crate::term::{Link, say, tell};
use crate::ui_assets::ASSETS;

/// The commands the browser may run (`device` only to add or revoke, or to join in a new home).
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    "whoami", "add", "profile", "devices", "device", "paperkey", "contacts", "send", "inbox",
    "listen", "share", "files", "download", "publish", "unpublish", "shared", "browse", "search",
    "history", "edit", "delete", "react", "reply", "timer", "name", "typing", "settings",
    "register", "recover",
];
/// Flags that would point a command at another home or server.
const HOME_FLAGS: &[&str] = &["--home", "--server", "--allow-plaintext"];
/// How many commands one page may run at once (a `listen` and a `share` wait among them).
const MAX_RUNS: usize = 64;
/// The largest WebSocket message the gateway reads (a message's text is at most 64 KiB).
const MAX_WS_MESSAGE: usize = 256 << 10;
/// The largest upload (a file to share or publish).
const MAX_UPLOAD: u64 = 8 << 30;
/// How long an unclaimed download waits in the stage.
const DOWNLOAD_KEEP: Duration = Duration::from_secs(600);
/// Environment variable: serve the front end's files from this directory instead of the
/// embedded copies (front-end development; only the files the binary embeds).
pub(crate) const UI_DIR_ENV: &str = "KEZ_UI_DIR";

/// How `kez-chat ui` was asked to run.
pub(crate) struct Options {
    /// The loopback port (0: any free one).
    pub(crate) port: u16,
    /// Open the browser.
    pub(crate) open: bool,
    /// Print the URL as one JSON line.
    pub(crate) json: bool,
    /// The `--server` given, offered to a registration in the browser.
    pub(crate) server: Option<String>,
}

/// One run of the gateway.
struct Gateway {
    home: Home,
    token: String,
    port: u16,
    /// Uploads and downloads in flight: `<home>/ui/run-<pid>/`, 0700, removed at exit.
    stage: PathBuf,
    server: Option<String>,
    uploads: Mutex<HashMap<String, PathBuf>>,
    downloads: Mutex<HashMap<String, PathBuf>>,
    assets_dir: Option<PathBuf>,
}

type Body = BoxBody<Bytes, std::io::Error>;

/// `kez-chat ui`: serves until Ctrl-C or SIGTERM.
pub(crate) async fn serve(home: Home, options: Options) -> Result<(), Failure> {
    let registered = home.config().map_err(Failure::home)?.handle.clone();
    if registered.is_some() {
        // Started (or found) now, so the page's first command does not wait for it.
        drop(service::connect_or_start(&home).await?);
    }
    let listener = TcpListener::bind(("127.0.0.1", options.port))
        .await
        .map_err(|err| {
            Failure::new(
                USAGE,
                format!(
                    "cannot listen on 127.0.0.1:{}: {err}; choose another --port (0: any free one)",
                    options.port
                ),
            )
        })?;
    let port = listener
        .local_addr()
        .map_err(|err| Failure::new(RUNTIME, err.to_string()))?
        .port();
    let stage = prepare_stage(&home)?;
    let gateway = Arc::new(Gateway {
        home,
        token: new_token(),
        port,
        stage,
        server: options.server,
        uploads: Mutex::new(HashMap::new()),
        downloads: Mutex::new(HashMap::new()),
        assets_dir: std::env::var_os(UI_DIR_ENV).map(PathBuf::from),
    });
    let url = format!("http://127.0.0.1:{port}/{}/", gateway.token);
    if options.json {
        say!("{}", json!({ "url": url }));
    } else {
        tell!(
            "kez-chat UI for {} at {url}",
            registered
                .as_deref()
                .unwrap_or("a new home (register in the page)")
        );
        tell!(
            "the address is the key to your chat while this runs: do not share it. Ctrl-C stops it"
        );
    }
    if options.open && !open_browser(&url) {
        tell!("no browser to open here: open the address above in yours");
    }
    let (stop, stopping) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| Failure::new(RUNTIME, format!("cannot handle SIGTERM: {err}")))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                // Frames are small and come in bursts: Nagle's algorithm would hold the last
                // one of each for the browser's delayed ACK (40 ms a command).
                let _ = stream.set_nodelay(true);
                let gateway = gateway.clone();
                let stopping = stopping.clone();
                tokio::spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(stream),
                            hyper::service::service_fn(move |request| {
                                answer(gateway.clone(), stopping.clone(), request)
                            }),
                        )
                        .with_upgrades();
                    let _ = connection.await;
                });
            }
        }
    }
    let _ = stop.send(true);
    // The pages' runs hear the stop and cancel theirs in the service.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(&gateway.stage);
    Ok(())
}

/// A fresh token: 32 random bytes, base64url.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

/// A random id for an upload or a download.
fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    format!("{prefix}-{}", data_encoding::HEXLOWER.encode(&bytes))
}

/// Makes this run's stage, removing those of gateways that are gone.
fn prepare_stage(home: &Home) -> Result<PathBuf, Failure> {
    let root = home.dir().join("ui");
    let make = |dir: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| Failure::new(RUNTIME, format!("cannot make {}: {err}", dir.display())))
    };
    make(&root)?;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let alive = name
                .strip_prefix("run-")
                .is_some_and(|pid| Path::new("/proc").join(pid).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let stage = root.join(format!("run-{}", std::process::id()));
    make(&stage)?;
    Ok(stage)
}

/// Opens `url` in the person's browser: `$BROWSER`, else the desktop's opener.
fn open_browser(url: &str) -> bool {
    let opener = std::env::var("BROWSER")
        .ok()
        .filter(|browser| !browser.trim().is_empty())
        .unwrap_or_else(|| {
            if cfg!(target_os = "macos") {
                "open".into()
            } else {
                "xdg-open".into()
            }
        });
    std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

/// Equal without telling by its time how much of the token matched.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Why a request is refused before it reaches a route.
fn check(
    gateway: &Gateway,
    headers: &HeaderMap,
    must_have_origin: bool,
) -> Result<(), (&'static str, &'static str)> {
    let port = gateway.port;
    let ours = |value: &str, scheme: &str| {
        value == format!("{scheme}127.0.0.1:{port}") || value == format!("{scheme}localhost:{port}")
    };
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok());
    if !host.is_some_and(|host| ours(host, "")) {
        return Err((
            "bad_host",
            "this address serves only 127.0.0.1 and localhost",
        ));
    }
    match headers.get(header::ORIGIN).map(|origin| origin.to_str()) {
        Some(Ok(origin)) if ours(origin, "http://") => {}
        None if !must_have_origin => {}
        _ => {
            return Err(("bad_origin", "requests from other sites are refused"));
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes() == b"cross-site")
    {
        return Err(("bad_origin", "requests from other sites are refused"));
    }
    Ok(())
}

/// Answers one HTTP request.
async fn answer(
    gateway: Arc<Gateway>,
    stopping: watch::Receiver<bool>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let token_ok = parts
        .next()
        .is_some_and(|given| same_token(given, &gateway.token));
    let rest = parts.next();
    let is_upgrade = request.headers().contains_key(header::UPGRADE);
    let must_have_origin = request.method() == Method::POST || is_upgrade;
    let port = gateway.port;
    if let Err((code, message)) = check(&gateway, request.headers(), must_have_origin) {
        return Ok(secure(error(StatusCode::FORBIDDEN, code, message), port));
    }
    if token_ok && rest.is_none() {
        // The address without its last slash: the page's relative addresses need it.
        let mut moved = Response::new(full(Bytes::new()));
        *moved.status_mut() = StatusCode::PERMANENT_REDIRECT;
        if let Ok(location) = HeaderValue::from_str(&format!("/{}/", gateway.token)) {
            moved.headers_mut().insert(header::LOCATION, location);
        }
        return Ok(secure(moved, port));
    }
    let Some(rest) = rest.filter(|_| token_ok) else {
        return Ok(secure(
            error(
                StatusCode::FORBIDDEN,
                "bad_token",
                "open the address `kez-chat ui` printed (it changes each time it starts)",
            ),
            port,
        ));
    };
    let response = match (request.method().clone(), rest) {
        (Method::GET, "ws") if is_upgrade => upgrade(gateway, stopping, request),
        (Method::POST, "upload") => upload(&gateway, request).await,
        (Method::GET, download) if download.starts_with("download/") => {
            send_download(&gateway, &download["download/".len()..]).await
        }
        (Method::GET | Method::HEAD, asset) => send_asset(&gateway, asset).await,
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "not_allowed",
            "not a request this page makes",
        ),
    };
    Ok(secure(response, port))
}

/// The headers every answer carries: the content security policy above all.
fn secure(mut response: Response<Body>, port: u16) -> Response<Body> {
    let headers = response.headers_mut();
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
         connect-src 'self' ws://127.0.0.1:{port} ws://localhost:{port}; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    );
    let fixed = [
        ("content-security-policy", csp.as_str()),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    ];
    for (name, value) in fixed {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    response
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A refusal with a stable code: `{"error":{"code","message"}}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = json!({ "error": { "code": code, "message": message } }).to_string();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_response(value: &Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// One of the front end's files.
async fn send_asset(gateway: &Gateway, path: &str) -> Response<Body> {
    let path = if path.is_empty() { "index.html" } else { path };
    let Some(asset) = ASSETS.iter().find(|asset| asset.path == path) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such file");
    };
    let bytes = match &gateway.assets_dir {
        Some(dir) => match tokio::fs::read(dir.join(asset.path)).await {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => Bytes::from_static(asset.bytes),
        },
        None => Bytes::from_static(asset.bytes),
    };
    let mut response = Response::new(full(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    response
}

/// Whether `name` may be a file's name in the stage: one plain path component.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

/// `POST upload?name=…`: stages a file the page will share or publish.
async fn upload(gateway: &Gateway, request: Request<Incoming>) -> Response<Body> {
    let name = request
        .uri()
        .query()
        .and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("name="))
                .map(percent_decode)
        })
        .flatten();
    let Some(name) = name.filter(|name| plain_file_name(name)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed",
            "an upload needs ?name= with a plain file name",
        );
    };
    let id = new_id("u");
    let dir = gateway.stage.join(&id);
    let path = dir.join(&name);
    let written = async {
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await?;
        let mut body = request.into_body();
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Ok(data) = frame.into_data() {
                size += data.len() as u64;
                if size > MAX_UPLOAD {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        "too large",
                    ));
                }
                file.write_all(&data).await?;
            }
        }
        file.flush().await?;
        Ok::<_, std::io::Error>(size)
    }
    .await;
    match written {
        Ok(size) => {
            gateway
                .uploads
                .lock()
                .expect("uploads lock")
                .insert(id.clone(), path);
            json_response(&json!({ "upload": id, "size": size }))
        }
        Err(err) => {
            let _ = std::fs::remove_dir_all(&dir);
            let (status, code) = if err.kind() == std::io::ErrorKind::FileTooLarge {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, "upload_failed")
            };

            error(status, code, &format!("the upload failed: {err}"))
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space); `None` for a malformed escape or not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'%' => {
                let high = (input.next()? as char).to_digit(16)?;
                let low = (input.next()? as char).to_digit(16)?;
                bytes.push((high * 16 + low) as u8);
            }
            b'+' => bytes.push(b' '),
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

/// `GET download/d-…`: a file a `download` fetched into the stage, once, as an attachment.
async fn send_download(gateway: &Gateway, id: &str) -> Response<Body> {
    let path = gateway.downloads.lock().expect("downloads lock").remove(id);
    let Some(path) = path else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such download (each is sent once; download it again)",
        );
    };
    let file = tokio::fs::File::open(&path).await;
    // Open, it can leave the stage: the answer reads what is open.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let file = match file {
        Ok(file) => file,
        Err(err) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "download_failed",
                &format!("cannot read the download: {err}"),
            );
        }
    };
    let size = file.metadata().await.map(|m| m.len()).ok();
    let stream = tokio_util::io::ReaderStream::new(file).map(|chunk| chunk.map(BodyFrame::data));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = HeaderValue::from_str(&format!(
        "attachment; filename*=UTF-8''{}",
        percent_encode(&name)
    )) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Some(size) = size {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    response
}

/// RFC 5987's encoding of a header parameter: everything but unreserved characters as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `GET ws`: the WebSocket handshake (RFC 6455), then the page's session.
fn upgrade(
    gateway: Arc<Gateway>,
    stopping: watch::Receiver<bool>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let headers = request.headers();
    let key = headers.get("sec-websocket-key").cloned();
    let websocket = headers
        .get(header::UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers
            .get("sec-websocket-version")
            .is_some_and(|value| value.as_bytes() == b"13");
    let Some(key) = key.filter(|_| websocket) else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed",
            "a WebSocket version 13 handshake is expected here",
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrading.await else {
            return;
        };
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_WS_MESSAGE);
        config.max_frame_size = Some(MAX_WS_MESSAGE);
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session(gateway, stopping, socket).await;
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", accept);
    }
    response
}

/// What a page sends over its WebSocket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageMessage {
    id: u64,
    #[serde(default)]
    run: Option<Vec<String>>,
    /// `null` is the end of the input, not its absence.
    #[serde(default, deserialize_with = "present")]
    input: Option<Option<String>>,
    #[serde(default)]
    cancel: Option<bool>,
}

/// A member that is there, `null` or not.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

/// The page's session: its runs, relayed to the service.
async fn session<S>(
    gateway: Arc<Gateway>,
    mut stopping: watch::Receiver<bool>,
    socket: WebSocketStream<S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    let (out, mut outgoing) = mpsc::channel::<String>(256);
    let (done, mut finished) = mpsc::unbounded_channel::<u64>();
    let mut runs: HashMap<u64, mpsc::UnboundedSender<ClientFrame>> = HashMap::new();
    if sink
        .send(Message::text(hello(&gateway).to_string()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            _ = stopping.changed() => break,
            id = finished.recv() => {
                if let Some(id) = id {
                    runs.remove(&id);
                }
            }
            line = outgoing.recv() => {
                let Some(line) = line else { break };
                if sink.send(Message::text(line)).await.is_err() {
                    break;
                }
            }
            message = stream.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Binary(_))) => {
                        let refusal = json!({ "error": { "code": "malformed", "message": "only text messages" } });
                        let _ = out.try_send(refusal.to_string());
                        continue;
                    }
                    _ => break,
                };
                let message = match serde_json::from_str::<PageMessage>(text.as_str()) {
                    Ok(message) => message,
                    Err(err) => {
                        let refusal = json!({ "error": { "code": "malformed", "message": format!("not a message: {err}") } });
                        let _ = out.try_send(refusal.to_string());
                        continue;
                    }
                };
                page_message(&gateway, message, &mut runs, &out, &done);
            }
        }
    }
    // The page is gone: its commands stop as on Ctrl-C.
    for (_, run) in runs.drain() {
        let _ = run.send(ClientFrame::Cancel { signal: None });
    }
    let _ = sink.close().await;
}

/// The first message of a session, and again once a registration succeeded.
fn hello(gateway: &Gateway) -> Value {
    let config = gateway.home.config().ok();
    json!({ "hello": {
        "registered": config.as_ref().is_some_and(|config| config.handle.is_some()),
        "handle": config.as_ref().and_then(|config| config.handle.clone()),
        "server": config.and_then(|config| config.server).or_else(|| gateway.server.clone()),
        "version": env!("CARGO_PKG_VERSION"),
    }})
}

/// Starts a run, or hands a run its input or its cancel.
fn page_message(
    gateway: &Arc<Gateway>,
    message: PageMessage,
    runs: &mut HashMap<u64, mpsc::UnboundedSender<ClientFrame>>,
    out: &mpsc::Sender<String>,
    done: &mpsc::UnboundedSender<u64>,
) {
    let id = message.id;
    let refuse = |code: &str, text: String| {
        let frame = json!({ "id": id, "frame": { "refused": { "code": code, "message": text } } });
        let _ = out.try_send(frame.to_string());
    };
    match (message.run, message.input, message.cancel) {
        (Some(args), None, None) => {
            if runs.contains_key(&id) {
                return refuse("malformed", format!("run {id} is running already"));
            }
            if runs.len() >= MAX_RUNS {
                return refuse(
                    "too_many",
                    format!("at most {MAX_RUNS} commands run at once for one page"),
                );
            }
            let prepared = match prepare(gateway, args) {
                Ok(prepared) => prepared,
                Err((code, text)) => return refuse(code, text),
            };
            let (client, client_frames) = mpsc::unbounded_channel();
            runs.insert(id, client);
            let gateway = gateway.clone();
            let out = out.clone();
            let done = done.clone();
            tokio::spawn(async move {
                relay(&gateway, id, prepared, client_frames, &out).await;
                let _ = done.send(id);
            });
        }
        (None, Some(input), None) => {
            if let Some(run) = runs.get(&id) {
                let _ = run.send(ClientFrame::Input(input));
            }
        }
        (None, None, Some(true)) => {
            if let Some(run) = runs.get(&id) {
                let _ = run.send(ClientFrame::Cancel { signal: None });
            }
        }
        _ => refuse(
            "malformed",
            "a message has an id and one of run, input or cancel".into(),
        ),
    }
}

/// A command line checked and made concrete for this home.
#[derive(Debug)]
struct Prepared {
    args: Vec<String>,
    cwd: PathBuf,
    /// Runs in this process (a registration of a home with no service yet).
    here: bool,
    /// Uploads the command consumes, removed when it ends.
    consumed: Vec<PathBuf>,
    /// Where a `download` writes.
    download_dir: Option<PathBuf>,
}

/// Checks what the page asks to run: a command on the list, nothing that names another home
/// or server (but a registration's server), files only from uploads, downloads only into the
/// stage. `Err((code, message))` refuses it.
fn prepare(gateway: &Gateway, mut args: Vec<String>) -> Result<Prepared, (&'static str, String)> {
    let not_allowed = |text: String| ("not_allowed", text);
    let registered = gateway
        .home
        .config()
        .map_err(|err| ("unavailable", format!("cannot read the home: {err}")))?
        .handle
        .is_some();
    let text_at = args
        .iter()
        .position(|arg| arg == "--")
        .unwrap_or(args.len());
    if args.iter().map(String::len).sum::<usize>() > crate::local::MAX_LINE / 2 {
        return Err(("too_large", "the command line is too long".into()));
    }
    // What makes a home may name its server first: `--server URL [--allow-plaintext] register …`.
    let mut start = 0;
    while start < text_at && HOME_FLAGS[1..].contains(&args[start].as_str()) {
        start += if args[start] == "--server" { 2 } else { 1 };
    }
    let command = args
        .get(start)
        .filter(|_| start < text_at)
        .cloned()
        .unwrap_or_default();
    let sub = args.get(start + 1).map(String::as_str);
    if !ALLOWED.contains(&command.as_str()) {
        let what = match command.as_str() {
            "" => "nothing",
            flag if flag.starts_with('-') => "a flag",
            other => other,
        };
        return Err(not_allowed(format!(
            "{what} is not a command the page may run"
        )));
    }
    let makes_home = matches!(
        (command.as_str(), sub),
        ("register" | "recover", _) | ("device", Some("join"))
    );
    if start > 0 && !makes_home {
        return Err(not_allowed(
            "only a registration, a recovery or a joining device names its server".into(),
        ));
    }
    for arg in &args[start..text_at] {
        let flag = arg.split('=').next().unwrap_or_default();
        if HOME_FLAGS.contains(&flag) {
            return Err(not_allowed(format!("{flag} is not for the page")));
        }
    }
    if !registered && !makes_home {
        return Err((
            "unregistered",
            "this home is not registered yet: register, recover or join as a device first".into(),
        ));
    }
    if registered && command == "device" && !matches!(sub, Some("add" | "revoke")) {
        return Err(not_allowed(
            "this home's page may only add and revoke devices".into(),
        ));
    }
    // Without a server of its own, what makes a home goes to the one `kez-chat ui` was given.
    if makes_home
        && start == 0
        && let Some(server) = &gateway.server
    {
        args.splice(0..0, ["--server".to_owned(), server.clone()]);
        return prepare(gateway, args);
    }
    // Whatever follows a `--` is taken as it is: none of it may be a path.
    if matches!(command.as_str(), "share" | "publish" | "download") && text_at < args.len() {
        return Err(not_allowed(format!(
            "`{command}` takes no `--`: its file comes from an upload"
        )));
    }
    let mut consumed = Vec::new();
    // Positions of the file a command reads: it must come from an upload.
    let file_at = match command.as_str() {
        "share" => vec![start + 2],
        "publish" => vec![start + 1],
        "name" => args[start..text_at]
            .iter()
            .position(|arg| arg == "--avatar")
            .map(|at| vec![start + at + 1])
            .into_iter()
            .flatten()
            .collect(),
        _ => Vec::new(),
    };
    for (at, arg) in args.iter_mut().enumerate().take(text_at) {
        if arg.starts_with("--avatar=") {
            return Err(not_allowed(
                "give --avatar an upload as its own argument".into(),
            ));
        }
        let upload = arg.strip_prefix("upload:");
        if file_at.contains(&at) || upload.is_some() {
            let Some(path) =
                upload.and_then(|id| gateway.uploads.lock().expect("uploads lock").remove(id))
            else {
                return Err(not_allowed(
                    "a file comes from an upload (`upload:u-…`), each used once".into(),
                ));
            };
            *arg = path.to_string_lossy().into_owned();
            consumed.push(path);
        }
    }
    let mut download_dir = None;
    let mut cwd = gateway.stage.clone();
    if command == "download" {
        let plain: Vec<&String> = args[start + 1..text_at]
            .iter()
            .filter(|arg| *arg != "--json")
            .collect();
        if plain.len() != 1 || plain[0].starts_with('-') {
            return Err(not_allowed(
                "a download names one offer or file, and the page chooses where it goes".into(),
            ));
        }
        let dir = gateway.stage.join(new_id("d"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|err| {
                (
                    "unavailable",
                    format!("cannot make a download folder: {err}"),
                )
            })?;
        cwd = dir.clone();
        download_dir = Some(dir);
    }
    Ok(Prepared {
        args,
        cwd,
        here: !registered,
        consumed,
        download_dir,
    })
}

/// Runs a prepared command (in the service, or here for a registration) and relays its frames
/// to the page, tagged with its id.
async fn relay(
    gateway: &Arc<Gateway>,
    id: u64,
    prepared: Prepared,
    mut client: mpsc::UnboundedReceiver<ClientFrame>,
    out: &mpsc::Sender<String>,
) {
    let send = |frame: &Frame| {
        let line = json!({ "id": id, "frame": frame }).to_string();
        out.send(line)
    };
    let exit = if prepared.here {
        run_here(gateway, &prepared, &mut client, out, id).await
    } else {
        match run_in_service(gateway, &prepared, &mut client, out, id).await {
            Ok(exit) => exit,
            Err(failure) => Frame::Exit {
                code: failure.code,
                message: Some(failure.message),
            },
        }
    };
    for path in &prepared.consumed {
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if let (Some(dir), Frame::Exit { code: 0, .. }) = (&prepared.download_dir, &exit) {
        offer_download(gateway, id, dir, out).await;
    } else if let Some(dir) = &prepared.download_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = send(&exit).await;
    if prepared.here {
        let _ = out.send(hello(gateway).to_string()).await;
    }
}

/// Tells the page where to fetch what a `download` wrote, and forgets it after a while.
async fn offer_download(gateway: &Arc<Gateway>, id: u64, dir: &Path, out: &mpsc::Sender<String>) {
    let file = std::fs::read_dir(dir).ok().and_then(|entries| {
        entries
            .flatten()
            .find(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
            .map(|entry| entry.path())
    });
    let Some(file) = file else {
        let _ = std::fs::remove_dir_all(dir);
        return;
    };
    let download = new_id("d");
    let name = file
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    gateway
        .downloads
        .lock()
        .expect("downloads lock")
        .insert(download.clone(), file);
    let line =
        json!({ "id": id, "download": { "url": format!("download/{download}"), "name": name } });
    let _ = out.send(line.to_string()).await;
    let gateway = gateway.clone();
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        tokio::time::sleep(DOWNLOAD_KEEP).await;
        if gateway
            .downloads
            .lock()
            .expect("downloads lock")
            .remove(&download)
            .is_some()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    });
}

/// Relays a run through the home's service (started when none runs).
async fn run_in_service(
    gateway: &Gateway,
    prepared: &Prepared,
    client: &mut mpsc::UnboundedReceiver<ClientFrame>,
    out: &mpsc::Sender<String>,
    id: u64,
) -> Result<Frame, Failure> {
    let stream = service::connect_or_start(&gateway.home).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let lost = |why: String| Failure::new(RUNTIME, format!("lost the kez-chat service: {why}"));
    let request = LocalRequest::Run {
        args: prepared.args.clone(),
        cwd: prepared.cwd.clone(),
        tty: false,
    };
    service::send_frame(&mut write, &request)
        .await
        .map_err(|err| lost(err.to_string()))?;
    let mut client_open = true;
    loop {
        tokio::select! {
            frame = client.recv(), if client_open => match frame {
                Some(frame) => service::send_frame(&mut write, &frame)
                    .await
                    .map_err(|err| lost(err.to_string()))?,
                None => client_open = false,
            },
            line = service::read_line(&mut read) => {
                let line = match line {
                    Ok(Some(line)) => line,
                    Ok(None) => return Err(lost("it closed the connection".into())),
                    Err(Frame::Refused { message, .. }) => return Err(lost(message)),
                    Err(_) => return Err(lost("unreadable answer".into())),
                };
                let frame: Frame = serde_json::from_str(&line)
                    .map_err(|err| lost(format!("an answer that is not a frame: {err}")))?;
                match frame {
                    Frame::Exit { .. } | Frame::Refused { .. } => return Ok(frame),
                    frame => {
                        if out.send(json!({ "id": id, "frame": frame }).to_string()).await.is_err() {
                            let _ = service::send_frame(&mut write, &ClientFrame::Cancel { signal: None }).await;
                        }
                    }
                }
            }
        }
    }
}

/// Runs a registration in this process, as the CLI does in a home with no service.
async fn run_here(
    gateway: &Gateway,
    prepared: &Prepared,
    client: &mut mpsc::UnboundedReceiver<ClientFrame>,
    out: &mpsc::Sender<String>,
    id: u64,
) -> Frame {
    let (frames, mut outgoing) = mpsc::unbounded_channel();
    let (inputs, input) = mpsc::unbounded_channel();
    let (cancel, cancelled) = watch::channel(None);
    let link = Link {
        frames,
        input: tokio::sync::Mutex::new(input),
        cancelled,
        cwd: prepared.cwd.clone(),
        tty: false,
    };
    let held = Held::own();
    let command = service::run_linked(&gateway.home, held.clone(), prepared.args.clone(), link);
    tokio::pin!(command);
    let mut client_open = true;
    let exit = loop {
        tokio::select! {
            exit = &mut command => break exit,
            frame = outgoing.recv() => {
                if let Some(frame) = frame {
                    let _ = out.send(json!({ "id": id, "frame": frame }).to_string()).await;
                }
            }
            frame = client.recv(), if client_open => match frame {
                Some(ClientFrame::Input(text)) => {
                    let _ = inputs.send(text);
                }
                Some(ClientFrame::Cancel { .. }) | None => {
                    client_open = false;
                    let _ = cancel.send(Some("Ctrl-C"));
                    let _ = inputs.send(None);
                }
            },
        }
    };
    while let Ok(frame) = outgoing.try_recv() {
        let _ = out
            .send(json!({ "id": id, "frame": frame }).to_string())
            .await;
    }
    held.release().await;
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_in_full() {
        let token = new_token();
        assert_eq!(token.len(), 43);
        assert!(same_token(&token, &token));
        assert!(!same_token(&token[..42], &token));
        assert!(!same_token("", &token));
        let mut other = token.clone().into_bytes();
        other[42] ^= 1;
        assert!(!same_token(std::str::from_utf8(&other).unwrap(), &token));
    }

    #[test]
    fn file_names_are_one_plain_component() {
        for good in ["report.pdf", "a b.txt", "ünïcode.png", ".hidden"] {
            assert!(plain_file_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "..\\x",
            "a\nb",
            "a\u{0}b",
            &"x".repeat(256),
        ] {
            assert!(!plain_file_name(bad), "{bad:?}");
        }
    }

    /// A gateway on a fresh home in `dir`, registered as alice or not.
    fn gateway(dir: &Path, registered: bool) -> Gateway {
        let home = Home::open(dir.join("home")).unwrap();
        if registered {
            let mut config = home.config().unwrap();
            config.handle = Some("@alice@kez.localhost".into());
            config.server = Some("nats://127.0.0.1:1".into());
            home.save_config(&config).unwrap();
        }
        let stage = prepare_stage(&home).unwrap();
        Gateway {
            home,
            token: new_token(),
            port: 1,
            stage,
            server: Some("nats://127.0.0.1:2".into()),
            uploads: Mutex::new(HashMap::new()),
            downloads: Mutex::new(HashMap::new()),
            assets_dir: None,
        }
    }

    fn line(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_owned()).collect()
    }

    fn refusal(gateway: &Gateway, args: &[&str]) -> &'static str {
        prepare(gateway, line(args)).expect_err("refused").0
    }

    #[test]
    fn a_page_runs_only_the_listed_commands_on_its_own_home() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = gateway(dir.path(), true);
        let sent = prepare(
            &gateway,
            line(&["send", "@bob", "--json", "--", "--home /tmp"]),
        )
        .unwrap();
        assert_eq!(
            sent.args,
            line(&["send", "@bob", "--json", "--", "--home /tmp"])
        );
        assert_eq!(sent.cwd, gateway.stage);
        assert!(!sent.here);
        for refused in [
            &["service", "stop"][..],
            &["ui"],
            &["rotate"],
            &[],
            &["--home", "/tmp", "whoami"],
            &["whoami", "--home", "/tmp"],
            &["whoami", "--home=/tmp"],
            &["send", "@bob", "--server", "nats://evil:4222", "hi"],
            &["--server", "nats://evil:4222", "send", "@bob", "hi"],
            &["send", "@bob", "--allow-plaintext", "hi"],
            &["device", "join", "@alice"],
            &["share", "@bob", "/etc/passwd"],
            &["share", "@bob", "upload:u-0000"],
            &["publish", "/etc/passwd", "--public"],
            &["name", "Alice", "--avatar", "/etc/passwd"],
            &["name", "Alice", "--avatar=upload:u-1"],
            &["download", "abc", "-o", "/tmp/x"],
            &["download", "abc", "--output=/tmp/x"],
            &["download", "abc", "def"],
            &["download", "abc", "--json", "--", "-o/tmp/x"],
            &["share", "@bob", "--", "/etc/passwd"],
            &["share", "@bob", "upload:u-1", "--", "/etc/passwd"],
            &["publish", "--public", "--", "/etc/passwd"],
        ] {
            assert_eq!(refusal(&gateway, refused), "not_allowed", "{refused:?}");
        }
        for allowed in [
            &["device", "add", "kez-pair:x"][..],
            &["device", "revoke", "phone"],
        ] {
            prepare(&gateway, line(allowed)).unwrap_or_else(|_| panic!("{allowed:?}"));
        }
    }

    #[test]
    fn a_file_comes_from_an_upload_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = gateway(dir.path(), true);
        let staged = gateway.stage.join("u-1").join("notes.txt");
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, b"hi").unwrap();
        gateway
            .uploads
            .lock()
            .unwrap()
            .insert("u-1".into(), staged.clone());
        let shared = prepare(&gateway, line(&["share", "@bob", "upload:u-1", "--json"])).unwrap();
        assert_eq!(shared.args[2], staged.to_string_lossy());
        assert_eq!(shared.consumed, vec![staged]);
        assert_eq!(
            refusal(&gateway, &["share", "@bob", "upload:u-1"]),
            "not_allowed",
            "used once"
        );
        let download = prepare(&gateway, line(&["download", "@bob/notes.txt", "--json"])).unwrap();
        let into = download.download_dir.expect("a download folder");
        assert!(into.starts_with(&gateway.stage) && into.is_dir());
        assert_eq!(download.cwd, into);
    }

    #[test]
    fn a_new_home_only_makes_itself_here_with_the_given_server() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = gateway(dir.path(), false);
        assert_eq!(refusal(&gateway, &["send", "@bob", "hi"]), "unregistered");
        assert_eq!(refusal(&gateway, &["whoami"]), "unregistered");
        let register = prepare(&gateway, line(&["register", "alice", "--json"])).unwrap();
        assert!(register.here);
        assert_eq!(
            register.args,
            line(&[
                "--server",
                "nats://127.0.0.1:2",
                "register",
                "alice",
                "--json"
            ])
        );
        let own = prepare(
            &gateway,
            line(&[
                "--server",
                "nats://10.0.0.1:4222",
                "--allow-plaintext",
                "register",
                "alice",
            ]),
        )
        .unwrap();
        assert_eq!(own.args[1], "nats://10.0.0.1:4222");
        prepare(&gateway, line(&["device", "join", "@alice@kez.localhost"])).unwrap();
        prepare(&gateway, line(&["recover", "@alice@kez.localhost"])).unwrap();
    }

    #[test]
    fn percent_escapes_round_trip() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%E2%9C%93").as_deref(), Some("✓"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(percent_encode("a b✓.txt"), "a%20b%E2%9C%93.txt");
    }
}
