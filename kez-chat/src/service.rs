//! The kez-chat service: the one process that owns a home (ARCHITECTURE.md, "One owner per
//! home"). It holds the store, the connection to the broker and the blob node; receives
//! messages as they arrive; serves the user's files while it runs; and runs the commands of
//! its clients — the CLI, later the UI — over the local API (`local.rs`, PROTOCOL.md §12).
//!
//! `kez-chat service` runs it in the foreground (a systemd user unit: `deploy/`); every other
//! command of a registered home is a client that starts it when none runs (`--announce`: one
//! JSON line on stdout saying it is ready or why not, then a log in `<home>/service.log`).
//! One service per home: it holds `<home>/service.lock` while it runs, so a second one is
//! refused, and a socket left behind by a crash is replaced. A client must be the home's owner
//! (the socket's peer uid). A service stops on `service stop`, SIGTERM or Ctrl-C, and when its
//! socket is removed (its home deleted).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use kez_blobs::BlobNode;
use kez_client::{Connection, Home, Store, StoredMessage, now};
use kez_core::{PublicKey, SecretKey};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OnceCell, broadcast, mpsc, oneshot, watch};

use crate::failure::{CONFLICT, Failure, NOT_FOUND, RUNTIME, USAGE};
use crate::local::{
    Announce, ClientFrame, Frame, LOCK_FILE, LOG_FILE, MAX_LINE, Request, SOCKET_FILE, Status,
};
use crate::term::{self, Link, say, tell};
use crate::{App, Cli, FETCH_MAX, LISTEN_WAIT, Sender};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the service checks that its socket is still there.
const SOCKET_CHECK: Duration = Duration::from_secs(2);
/// How long a stopping service tries to say "offline" and close its connection.
const GOODBYE_LIMIT: Duration = Duration::from_secs(3);
/// How long a stopping service lets running commands finish.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a client waits for a service it started (or saw starting) to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many live events a slow listener may fall behind before it is told it missed some.
const EVENT_BACKLOG: usize = 1024;
/// How often the service deletes messages whose disappearing-message timer ran out.
const PURGE_EVERY: Duration = Duration::from_secs(10);
/// A service log larger than this is started afresh.
const MAX_LOG_BYTES: u64 = 4 << 20;

/// Something that happened, for the `listen`ers.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A message was received (or a copy of one sent from another own device), stored, and is
    /// shown now.
    Message(Sender, StoredMessage),
    /// A line for people: about receiving itself (it stopped, it works again), or about a
    /// change (an edit, a reaction) beside its [`Event::Changed`].
    Note(String),
    /// A change (an edit, a delete, a reaction, a receipt, a timer) was applied to the
    /// conversation with this peer.
    Changed(PublicKey),
    /// A live notice (typing, presence) of a contact.
    Live(kez_client::LiveNotice),
    /// A sent message did not reach a device of the contact with this handle: the home
    /// server's bounce (federation), recorded on the message and shown now.
    Undelivered(String, kez_client::UndeliveredNote),
}

/// A listener that shows messages to a person, counted while it lives ([`Held::reading`]).
pub(crate) struct Reading(Arc<AtomicUsize>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What commands use and, in the service, keep between them: the store, the connection, the
/// blob node, and the live events. A command run without a service (`register`, `recover`,
/// `device join`) has its own, released when it ends.
pub(crate) struct Held {
    kept: bool,
    store: std::sync::Mutex<Option<Arc<Store>>>,
    conn: tokio::sync::Mutex<Option<(String, Connection)>>,
    node: OnceCell<Arc<BlobNode>>,
    events: broadcast::Sender<Event>,
    /// How many listeners show what arrives to a person (`listen`, not `listen --events`):
    /// only then is a shown message read.
    readers: Arc<AtomicUsize>,
    /// Whether receiving is failing now (for one line when it stops and one when it works).
    failing: Arc<AtomicBool>,
    /// Held by whoever builds a link of the own chain on its head and appends it: in the
    /// service, the receiver advertising the file node and a command may otherwise both append
    /// the same sequence number.
    pub(crate) chain_writer: tokio::sync::Mutex<()>,
    /// Asks the service's receiver to fetch now; answered when the fetch is stored.
    fetch: Option<mpsc::Sender<oneshot::Sender<Result<(), Failure>>>>,
}

/// Marks receiving as failing; whether it was working until then (the one who flips it says so).
fn stopped_now(failing: &AtomicBool) -> bool {
    !failing.swap(true, Ordering::SeqCst)
}

impl Held {
    /// Resources for one command, released by [`Held::release`].
    pub(crate) fn own() -> Arc<Held> {
        Arc::new(Held::new(false, None))
    }

    fn new(kept: bool, fetch: Option<mpsc::Sender<oneshot::Sender<Result<(), Failure>>>>) -> Held {
        Held {
            kept,
            store: std::sync::Mutex::new(None),
            conn: tokio::sync::Mutex::new(None),
            node: OnceCell::new(),
            events: broadcast::channel(EVENT_BACKLOG).0,
            readers: Arc::new(AtomicUsize::new(0)),
            failing: Arc::new(AtomicBool::new(false)),
            chain_writer: tokio::sync::Mutex::new(()),
            fetch,
        }
    }

    /// Marks receiving as failing; whether it was working until now (then, and only then, a
    /// line says it stopped: one per outage, whoever notices it first).
    pub(crate) fn receiving_stopped(&self) -> bool {
        stopped_now(&self.failing)
    }

    /// The store, opened on first use.
    pub(crate) fn store(&self, home: &Home) -> Result<Arc<Store>, Failure> {
        let mut store = self.store.lock().expect("store lock");
        if let Some(store) = &*store {
            return Ok(store.clone());
        }
        let opened = Arc::new(home.store().map_err(Failure::store)?);
        *store = Some(opened.clone());
        Ok(opened)
    }

    /// The connection to `url` as `key`, made by `connect` with [`Held::options`] on first
    /// use; one to another URL than the held one is the command's own.
    pub(crate) async fn connection<F>(
        &self,
        url: &str,
        key: &Arc<SecretKey>,
        connect: F,
    ) -> Result<Connection, Failure>
    where
        F: AsyncFnOnce(async_nats::ConnectOptions) -> Result<Connection, Failure>,
    {
        let mut held = self.conn.lock().await;
        let replaces = match &*held {
            Some((held_url, conn)) if held_url == url => {
                if conn.nats().connection_state() == async_nats::connection::State::Connected {
                    return Ok(conn.clone());
                }
                // Down (the server stopped, or refuses this key now): a fresh connection
                // says why to the command that needs it, or replaces the held one.
                true
            }
            // Another server than the held connection's, named by `--server`: it takes the
            // held one's place when that one is down (the home moved), else it is the command's.
            Some((_, conn)) => {
                conn.nats().connection_state() != async_nats::connection::State::Connected
            }
            None => true,
        };
        let conn = connect(self.options(key)).await?;
        if replaces && let Some((_, old)) = held.replace((url.to_owned(), conn.clone())) {
            // Its users (the receiver) notice it closed and take the new one.
            tokio::spawn(old.close());
        }
        Ok(conn)
    }

    /// Makes a connection to `url` (the home's new server after `move`) the held one in place
    /// of the one held now, which is closed: the service's receiver takes the new one on its
    /// next round. The inbox floor is reset, since it counts the old server's inbox: the new
    /// one is fetched from its start (what was seen is dropped by id).
    pub(crate) async fn rehome<F>(
        &self,
        url: &str,
        store: &Store,
        key: &Arc<SecretKey>,
        connect: F,
    ) -> Result<Connection, Failure>
    where
        F: AsyncFnOnce(async_nats::ConnectOptions) -> Result<Connection, Failure>,
    {
        let conn = connect(self.options(key)).await?;
        let old = self
            .conn
            .lock()
            .await
            .replace((url.to_owned(), conn.clone()));
        if let Some((_, old)) = old {
            let _ = old.close().await;
        }
        store
            .set_inbox_floor(kez_client::InboxFloor::default())
            .map_err(Failure::store)?;
        Ok(conn)
    }

    /// The options of a connection as `key` ([`Connection::options_with_events`]), with a
    /// callback that tells the listeners when it drops.
    fn options(&self, key: &Arc<SecretKey>) -> async_nats::ConnectOptions {
        let failing = self.failing.clone();
        let events = self.events.clone();
        Connection::options_with_events(key, move |event| {
            if matches!(event, async_nats::Event::Disconnected) && stopped_now(&failing) {
                let _ = events.send(Event::Note(
                    "kez-chat: receiving stopped (the connection to the broker was lost); reconnecting, messages wait on the server meanwhile".into(),
                ));
            }
            std::future::ready(())
        })
    }

    /// The held connection, connected or reconnecting, if there is one.
    async fn current(&self) -> Option<Connection> {
        self.conn
            .lock()
            .await
            .as_ref()
            .map(|(_, conn)| conn.clone())
    }

    /// The blob node, opened by `open` on first use.
    pub(crate) async fn node<F>(&self, open: F) -> Result<Arc<BlobNode>, Failure>
    where
        F: AsyncFnOnce() -> Result<BlobNode, Failure>,
    {
        self.node
            .get_or_try_init(|| async { open().await.map(Arc::new) })
            .await
            .cloned()
    }

    /// The live events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether these outlive the command (the service's): work may go on behind it.
    pub(crate) fn outlives_commands(&self) -> bool {
        self.kept
    }

    /// Counts a listener that shows what arrives to a person (so it is read) while the guard
    /// lives.
    pub(crate) fn reading(&self) -> Reading {
        self.readers.fetch_add(1, Ordering::SeqCst);
        Reading(self.readers.clone())
    }

    /// Asks the service's receiver to fetch what the inbox holds now and store it, and waits
    /// for that; `false` without a service.
    pub(crate) async fn fetch_now(&self) -> Result<bool, Failure> {
        let Some(fetch) = &self.fetch else {
            return Ok(false);
        };
        let (done, answer) = oneshot::channel();
        let gone = || Failure::new(RUNTIME, "the service is stopping: run the command again");
        fetch.send(done).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())??;
        Ok(true)
    }

    /// Ends what a command without a service opened: the connection is drained (what it
    /// published is sent), the node shut down. The service's are kept.
    pub(crate) async fn release(&self) {
        if self.kept {
            return;
        }
        if let Some((_, conn)) = self.conn.lock().await.take() {
            let _ = conn.close().await;
        }
        self.shutdown_node().await;
    }

    async fn shutdown_node(&self) {
        if let Some(node) = self.node.get() {
            let _ = node.shutdown().await;
        }
    }
}

/// Resolves when `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The path of the home's socket.
fn socket_path(home: &Home) -> PathBuf {
    home.dir().join(SOCKET_FILE)
}

/// The state of a running service.
struct Service {
    home: Home,
    app: App,
    since: u64,
    running: AtomicUsize,
    stop: watch::Sender<bool>,
    owner: u32,
    /// The program file it runs, and what identified that file when it started.
    program: Option<(PathBuf, ProgramFile)>,
    /// Set when the program file was replaced (an upgrade): the service runs the new one in
    /// its place once it stopped.
    upgraded: AtomicBool,
}

/// What tells one program file from the one that replaced it: device, inode, modification time.
type ProgramFile = (u64, u64, i64, i64);

fn program_file(path: &Path) -> Option<ProgramFile> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((
        metadata.dev(),
        metadata.ino(),
        metadata.mtime(),
        metadata.mtime_nsec(),
    ))
}

/// `kez-chat service`: runs the service until it is stopped. With `announce`, the one stdout
/// line a client that started it waits for.
pub(crate) async fn serve(home: Home, announce: bool) -> Result<(), Failure> {
    let started = start(home).await;
    let (service, listener, fetch) = match started {
        Ok(started) => started,
        Err(Start::Running(pid)) => {
            if announce {
                announce_line(&Announce::Running { pid });
            }
            return Err(Failure::new(
                CONFLICT,
                format!(
                    "a kez-chat service already runs for this home (pid {pid}): every command uses it; `kez-chat service stop` stops it"
                ),
            ));
        }
        Err(Start::Failed(failure)) => {
            if announce {
                announce_line(&Announce::Failed {
                    code: failure.code,
                    message: failure.message.clone(),
                });
            }
            return Err(failure);
        }
    };
    let service = Arc::new(service);
    if announce {
        announce_line(&Announce::Ready {
            pid: std::process::id(),
        });
    } else {
        tell!(
            "kez-chat service for {} running (pid {}); clients connect at {}; Ctrl-C or `kez-chat service stop` stops it",
            service.app.config.handle.as_deref().unwrap_or_default(),
            std::process::id(),
            socket_path(&service.home).display()
        );
    }
    let receiver = tokio::spawn(receive(service.clone(), fetch));
    let live = tokio::spawn(hear_live(service.clone()));
    let watchdog = tokio::spawn(watch_socket(service.clone()));
    let purger = tokio::spawn(purge_expired(service.clone()));
    let mut stop = service.stop.subscribe();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| Failure::new(RUNTIME, format!("cannot handle SIGTERM: {err}")))?;
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(service.clone(), stream));
                }
                Err(err) => {
                    tracing::warn!("cannot accept a client: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = service.stop.send(true);
    drop(listener);
    let _ = std::fs::remove_file(socket_path(&service.home));
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while service.running.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watchdog.abort();
    purger.abort();
    live.abort();
    // Saying goodbye is bounded: a broker that is gone would otherwise keep a stopping
    // service waiting for a connect, a publish or a flush that never ends.
    let goodbye = async {
        let _ = receiver.await;
        if let Some((_, conn)) = service.app.held.conn.lock().await.take() {
            if let Ok(store) = service.app.store() {
                crate::chat::announce_presence(
                    &service.app,
                    &store,
                    &conn,
                    kez_core::chat::PresenceState::Offline,
                )
                .await;
            }
            let _ = conn.close().await;
        }
    };
    if tokio::time::timeout(GOODBYE_LIMIT, goodbye).await.is_err() {
        tracing::warn!(
            "the broker did not answer within {} s: stopped without closing the connection",
            GOODBYE_LIMIT.as_secs()
        );
    }
    service.app.held.shutdown_node().await;
    if service.upgraded.load(Ordering::SeqCst)
        && let Some((program, _)) = &service.program
    {
        run_upgraded(program);
    }
    Ok(())
}

fn announce_line(announce: &Announce) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "{}",
        serde_json::to_string(announce).expect("an announce serializes")
    );
    let _ = stdout.flush();
}

enum Start {
    Running(u32),
    Failed(Failure),
}

type Fetches = mpsc::Receiver<oneshot::Sender<Result<(), Failure>>>;

/// Takes the home: its lock, its store, its socket.
async fn start(home: Home) -> Result<(Service, UnixListener, Fetches), Start> {
    let lock_path = home.dir().join(LOCK_FILE);
    let mut lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|err| {
            Start::Failed(Failure::new(
                RUNTIME,
                format!("cannot open {}: {err}", lock_path.display()),
            ))
        })?;
    if lock.try_lock().is_err() {
        let pid = std::fs::read_to_string(&lock_path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        return Err(Start::Running(pid));
    }
    let _ = lock.set_len(0);
    let _ = write!(lock, "{}", std::process::id());
    // The lock is the process's until it exits, however it exits.
    std::mem::forget(lock);
    let failed = Start::Failed;
    let config = home.config().map_err(|err| failed(Failure::home(err)))?;
    let (fetch_tx, fetch_rx) = mpsc::channel(64);
    let app = App {
        config,
        home: home.clone(),
        server_flag: None,
        plaintext_flag: false,
        held: Arc::new(Held::new(true, Some(fetch_tx))),
    };
    app.handle().map_err(failed)?;
    app.server().map_err(failed)?;
    app.store().map_err(failed)?;
    let path = socket_path(&home);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!("replaced the socket a stopped service left behind"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(failed(Failure::new(
                RUNTIME,
                format!("cannot remove the old socket {}: {err}", path.display()),
            )));
        }
    }
    let listener = UnixListener::bind(&path).map_err(|err| {
        failed(Failure::new(
            RUNTIME,
            format!("cannot listen on {}: {err}", path.display()),
        ))
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|err| {
        failed(Failure::new(
            RUNTIME,
            format!("cannot make {} private: {err}", path.display()),
        ))
    })?;
    let owner = std::fs::metadata(home.dir())
        .map_err(|err| {
            failed(Failure::new(
                RUNTIME,
                format!("cannot read the home: {err}"),
            ))
        })?
        .uid();
    let program = std::env::current_exe()
        .ok()
        .and_then(|path| program_file(&path).map(|file| (path, file)));
    let service = Service {
        home,
        app,
        since: now(),
        running: AtomicUsize::new(0),
        stop: watch::channel(false).0,
        owner,
        program,
        upgraded: AtomicBool::new(false),
    };
    Ok((service, listener, fetch_rx))
}

/// Stops the service when its socket is removed or replaced (its home deleted, a second
/// service forced in by hand): a service nobody can reach has nothing to do. Also when its
/// program file was replaced (an upgrade) and the new one stayed the same for a check: then
/// it runs the new program once it stopped, so clients never talk to an older service.
async fn watch_socket(service: Arc<Service>) {
    let path = socket_path(&service.home);
    let inode = std::fs::metadata(&path).map(|metadata| metadata.ino()).ok();
    let mut replaced_by = None;
    loop {
        tokio::time::sleep(SOCKET_CHECK).await;
        if std::fs::metadata(&path).map(|metadata| metadata.ino()).ok() != inode {
            tracing::warn!("{} is gone: stopping", path.display());
            let _ = service.stop.send(true);
            return;
        }
        let Some((program, started_as)) = &service.program else {
            continue;
        };
        let now_file = program_file(program).filter(|file| file != started_as);
        if now_file.is_some() && now_file == replaced_by {
            tracing::warn!(
                "{} was replaced (an upgrade): restarting the service into it",
                program.display()
            );
            service.upgraded.store(true, Ordering::SeqCst);
            let _ = service.stop.send(true);
            return;
        }
        replaced_by = now_file;
    }
}

/// Runs the upgraded program in this process's place (the same pid, so a supervisor such as
/// systemd sees one service), as it was started; returns only if that fails.
fn run_upgraded(program: &Path) {
    use std::os::unix::process::CommandExt;
    // A client that started this service read its one announce line long ago.
    let args = std::env::args_os()
        .skip(1)
        .filter(|arg| arg != "--announce");
    let err = std::process::Command::new(program).args(args).exec();
    tracing::warn!(
        "cannot run the new {} ({err}): stopped; the next command starts it",
        program.display()
    );
}

/// Hands the live notices (typing, presence) of contacts to the listeners, on whichever
/// connection is held now.
async fn hear_live(service: Arc<Service>) {
    let app = &service.app;
    let Ok(store) = app.store() else {
        return;
    };
    loop {
        if let Some(conn) = app.held.current().await {
            match conn.live_notices(&store).await {
                Ok(notices) => {
                    tokio::pin!(notices);
                    while let Some(notice) = notices.next().await {
                        let _ = app.held.events.send(Event::Live(notice));
                    }
                }
                Err(err) => tracing::debug!("no live notices for now: {err}"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes the messages whose disappearing-message timer ran out, every [`PURGE_EVERY`].
async fn purge_expired(service: Arc<Service>) {
    loop {
        if let Ok(store) = service.app.store() {
            match store.purge_expired(now()) {
                Ok(0) => {}
                Ok(purged) => tracing::info!("{purged} disappearing messages deleted"),
                Err(err) => tracing::warn!("cannot delete disappearing messages: {err}"),
            }
        }
        tokio::time::sleep(PURGE_EVERY).await;
    }
}

/// Receives while the service runs: connects (and reconnects), keeps the own devices and the
/// file node's endpoint current, fetches when the inbox says there is mail (and when a client
/// asks), and shows what arrived to the listeners.
async fn receive(service: Arc<Service>, mut fetches: Fetches) {
    let app = &service.app;
    let mut stop = service.stop.subscribe();
    let Ok(store) = app.store() else {
        return;
    };
    let Ok(handle) = app.handle().map(str::to_owned) else {
        return;
    };
    let mut ready = false;
    let mut retry = Duration::from_millis(500);
    // A client's request for a fetch that came while there was no connection.
    let mut pending: Option<oneshot::Sender<Result<(), Failure>>> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        // The held connection, whichever server a command last pointed it at; else one to
        // the configured server.
        let held = app.held.current().await;
        let conn = match held {
            Some(conn) => Ok(conn),
            None => app.connect().await,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(failure) => {
                tracing::warn!("cannot connect ({}); trying again", failure.message);
                if let Some(asked) = pending.take() {
                    let _ = asked.send(Err(failure));
                }
                // A client asking for a fetch meanwhile ends the pause: the server may be back.
                tokio::select! {
                    () = stopped(&mut stop) => return,
                    () = tokio::time::sleep(retry) => {
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                    Some(asked) = fetches.recv() => pending = Some(asked),
                }
                continue;
            }
        };
        retry = Duration::from_millis(500);
        if !ready {
            ready = prepare(app, &conn, &store, &handle).await;
            if ready {
                crate::chat::announce_presence(
                    app,
                    &store,
                    &conn,
                    kez_core::chat::PresenceState::Online,
                )
                .await;
            }
        }
        let failing = app.held.failing.load(Ordering::SeqCst);
        let wait = if failing { Duration::ZERO } else { LISTEN_WAIT };
        let (received, asked) = if let Some(asked) = pending.take() {
            (
                conn.receive(&store, FETCH_MAX, Duration::ZERO).await,
                Some(asked),
            )
        } else {
            tokio::select! {
            () = stopped(&mut stop) => return,
            Some(asked) = fetches.recv() => {
                // The held connection may have been replaced since this one was taken.
                let current = match app.held.current().await {
                    Some(current) => Ok(current),
                    None => app.connect().await,
                };
                let received = match current {
                    Ok(current) => current.receive(&store, FETCH_MAX, Duration::ZERO).await,
                    Err(failure) => {
                        let _ = asked.send(Err(failure));
                        continue;
                    }
                };
                (received, Some(asked))
            }
            received = conn.receive(&store, FETCH_MAX, wait) => (received, None),
            }
        };
        let answer = match received {
            Ok(received) => {
                for moved in conn.take_moves() {
                    let _ = app
                        .held
                        .events
                        .send(Event::Note(crate::moving::moved_note(&moved)));
                }
                crate::chat::received(app, &store, &conn, &received).await;
                let connected =
                    conn.nats().connection_state() == async_nats::connection::State::Connected;
                if connected && app.held.failing.swap(false, Ordering::SeqCst) {
                    let _ = app
                        .held
                        .events
                        .send(Event::Note("kez-chat: reconnected; receiving again".into()));
                }
                Ok(())
            }
            Err(err) => {
                if app.held.receiving_stopped() {
                    let _ = app.held.events.send(Event::Note(format!(
                        "kez-chat: receiving stopped ({}); reconnecting, messages wait on the server meanwhile",
                        crate::display::inline(&err.to_string())
                    )));
                }
                Err(Failure::client(err))
            }
        };
        for note in crate::chat::apply_received(&store, &conn.identity()) {
            let _ = app.held.events.send(note);
        }
        show_listeners(app, &store, &conn).await;
        let failed = answer.is_err();
        if let Some(asked) = asked {
            let _ = asked.send(answer);
        }
        if failed {
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// What the service does once connected: prepare forward secrecy (prekeys published, the Olm
/// key bound in the own chain), learn the own devices (so sends are copied to them) and serve
/// the user's files at the endpoint the chain names. `false` to try again.
async fn prepare(app: &App, conn: &Connection, store: &Store, handle: &str) -> bool {
    {
        let _writing = app.held.chain_writer.lock().await;
        match conn.prepare_forward_secrecy(store).await {
            Ok(kez_client::ForwardSecrecy::Ready) => {}
            Ok(kez_client::ForwardSecrecy::Unavailable(why)) => {
                tracing::warn!("messages are sealed without forward secrecy: {why}");
            }
            Err(err) => {
                tracing::warn!("cannot prepare forward secrecy ({err}); trying again");
                return false;
            }
        }
    }
    if let Err(err) = conn.own_devices(store, handle).await {
        tracing::warn!("cannot read the own sigchain ({err}); trying again");
        return false;
    }
    let node = match app.open_node().await {
        Ok(node) => node,
        Err(failure) => {
            tracing::warn!("cannot start the file node: {}", failure.message);
            return false;
        }
    };
    match app.key() {
        Ok(key) => match app.advertise_node(conn, &key, &node).await {
            Ok(()) => true,
            Err(failure) => {
                tracing::warn!("cannot advertise the file node: {}", failure.message);
                false
            }
        },
        Err(_) => false,
    }
}

/// Hands the stored messages nobody has seen to the listeners, if any, and marks them shown;
/// with no listener they wait for `inbox` or `listen`. Messages are stored (and acknowledged)
/// before they are shown, so a service killed in between shows them again when it runs next:
/// none is lost. Every sender is resolved (a `whois` for strangers may wait on the network)
/// before the first event is sent, so the only moment in which a kill shows messages twice is
/// between sending the events and marking them shown.
async fn show_listeners(app: &App, store: &Store, conn: &Connection) {
    if app.held.events.receiver_count() == 0 {
        return;
    }
    show_undelivered(app, store);
    let Ok(unshown) = store.unshown() else {
        return;
    };
    if unshown.is_empty() {
        return;
    }
    let mut shown = Vec::with_capacity(unshown.len());
    for (order, message) in unshown {
        let sender = Sender::resolve(store, conn, &message).await;
        shown.push((order, sender, message));
    }
    let orders: Vec<u64> = shown.iter().map(|(order, _, _)| *order).collect();
    let mut seen = std::collections::BTreeSet::new();
    for (_, sender, message) in shown {
        if message.direction == kez_client::Direction::Incoming {
            match (&sender, store.contact_by_key(&message.from)) {
                (Sender::Contact(_), Ok(Some(contact))) => {
                    seen.insert(contact.key);
                }
                (Sender::Stranger(..), _) => {
                    seen.insert(message.from);
                }
                _ => {}
            }
        }
        let _ = app.held.events.send(Event::Message(sender, message));
    }
    if let Err(err) = store.mark_shown(&orders) {
        tracing::warn!("cannot mark messages shown: {err}");
    }
    // Shown to a person: read. (A view that shows only what it is looking at, the web UI,
    // reads a conversation when it opens it.)
    if app.held.readers.load(Ordering::SeqCst) == 0 {
        return;
    }
    for peer in seen {
        app.mark_read(store, &peer).await;
    }
}

/// Hands the undelivered notes (bounces) nobody has seen to the listeners and marks them
/// shown; `history` shows them with their messages either way.
fn show_undelivered(app: &App, store: &Store) {
    let notes = match store.unshown_undelivered() {
        Ok(notes) if !notes.is_empty() => notes,
        Ok(_) => return,
        Err(err) => {
            tracing::warn!("cannot read the undelivered notes: {err}");
            return;
        }
    };
    for note in &notes {
        let handle = crate::contact_handle(store, &note.peer);
        let _ = app
            .held
            .events
            .send(Event::Undelivered(handle, note.clone()));
    }
    if let Err(err) = store.mark_undelivered_shown(&notes) {
        tracing::warn!("cannot mark undelivered notes shown: {err}");
    }
}

/// Answers one client.
async fn answer(service: Arc<Service>, stream: UnixStream) {
    service.running.fetch_add(1, Ordering::SeqCst);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let refused = |code: &str, message: String| Frame::Refused {
        code: code.to_owned(),
        message,
    };
    let owner = write.as_ref().peer_cred().map(|cred| cred.uid()).ok();
    let request = if owner != Some(service.owner) {
        Err(refused(
            "not_owner",
            "only the home's owner may use its service".into(),
        ))
    } else {
        match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut read)).await {
            Err(_) => Err(refused("malformed", "no request line within 10 s".into())),
            Ok(Err(refusal)) => Err(refusal),
            Ok(Ok(None)) => Err(refused("malformed", "no request line".into())),
            Ok(Ok(Some(line))) => serde_json::from_str::<Request>(&line)
                .map_err(|err| refused("malformed", format!("not a request: {err}"))),
        }
    };
    let request = match request {
        Ok(request) if *service.stop.borrow() => {
            let _ = request;
            Err(refused("stopping", "the service is stopping".into()))
        }
        other => other,
    };
    match request {
        Err(refusal) => {
            let _ = send_frame(&mut write, &refusal).await;
            let _ = write.shutdown().await;
            // Closing with unread bytes would reset the connection and lose the answer: read
            // (and drop) what the client still sends, for a moment.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::copy(&mut read, &mut tokio::io::sink()),
            )
            .await;
        }
        Ok(Request::Status {}) => {
            let status = service_status(&service).await;
            let _ = send_frame(&mut write, &status).await;
        }
        Ok(Request::Stop {}) => {
            let status = service_status(&service).await;
            let _ = send_frame(&mut write, &status).await;
            let _ = service.stop.send(true);
        }
        Ok(Request::Run { args, cwd, tty }) => run(&service, args, cwd, tty, read, write).await,
    }
    service.running.fetch_sub(1, Ordering::SeqCst);
}

async fn service_status(service: &Service) -> Status {
    let held = &service.app.held;
    // Not waited for while a connection is being made (a broker that is gone can take its
    // connect timeout): then it is not connected.
    let connected = match held.conn.try_lock().as_deref() {
        Ok(Some((_, conn))) => {
            conn.nats().connection_state() == async_nats::connection::State::Connected
        }
        _ => false,
    };
    Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        handle: service.app.config.handle.clone().unwrap_or_default(),
        home: service.home.dir().to_path_buf(),
        server: service.app.server().unwrap_or_default(),
        connected,
        files: held.node.get().map(|node| node.provider()),
        since: service.since,
        running: service.running.load(Ordering::SeqCst).saturating_sub(1),
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at the end.
pub(crate) async fn read_line<R: AsyncRead + Unpin>(
    read: &mut BufReader<R>,
) -> Result<Option<String>, Frame> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let mut limited = read.take(MAX_LINE as u64 + 1);
    let count = limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|err| Frame::Refused {
            code: "malformed".into(),
            message: format!("cannot read the request: {err}"),
        })?;
    if count == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE {
        return Err(Frame::Refused {
            code: "too_large".into(),
            message: format!("a line is larger than {MAX_LINE} bytes"),
        });
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| Frame::Refused {
            code: "malformed".into(),
            message: "a line is not UTF-8".into(),
        })
}

pub(crate) async fn send_frame<T: serde::Serialize>(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    frame: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(frame).expect("a frame serializes");
    line.push(b'\n');
    write.write_all(&line).await
}

/// Runs a client's command with the client's terminal.
async fn run(
    service: &Service,
    args: Vec<String>,
    cwd: PathBuf,
    tty: bool,
    mut read: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) {
    let (frames, mut outgoing) = mpsc::unbounded_channel();
    let (inputs, input) = mpsc::unbounded_channel();
    let (cancel, cancelled) = watch::channel(None);
    // The client's frames: answers to reads; Ctrl-C, a malformed frame or going away cancel.
    let mut stopping = service.stop.subscribe();
    let reader = tokio::spawn(async move {
        loop {
            let line = tokio::select! {
                line = read_line(&mut read) => line,
                // A stopping service stops its commands as Ctrl-C would (a `listen`, the wait
                // of a `share`), so they end in time and say so.
                () = stopped(&mut stopping) => {
                    let _ = cancel.send(Some("the service stopping"));
                    let _ = inputs.send(None);
                    std::future::pending::<()>().await;
                    continue;
                }
            };
            let frame = match line {
                Ok(Some(line)) => serde_json::from_str::<ClientFrame>(&line).ok(),
                _ => None,
            };
            match frame {
                Some(ClientFrame::Input(text)) => {
                    let _ = inputs.send(text);
                }
                Some(ClientFrame::Cancel { signal }) => {
                    let signal = if signal.as_deref() == Some("SIGTERM") {
                        "SIGTERM"
                    } else {
                        "Ctrl-C"
                    };
                    let _ = cancel.send(Some(signal));
                    let _ = inputs.send(None);
                    std::future::pending::<()>().await;
                }
                None => {
                    let _ = cancel.send(Some("Ctrl-C"));
                    // The command may still ask for input; it hears the end of it.
                    let _ = inputs.send(None);
                    std::future::pending::<()>().await;
                }
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if send_frame(&mut write, &frame).await.is_err() {
                // The client went away: the command goes on, its output nowhere.
                while outgoing.recv().await.is_some() {}
                return;
            }
        }
    });
    let link = Link {
        frames: frames.clone(),
        input: tokio::sync::Mutex::new(input),
        cancelled,
        cwd,
        tty,
    };
    let exit = run_linked(&service.home, service.app.held.clone(), args, link).await;
    let _ = frames.send(exit);
    drop(frames);
    let _ = writer.await;
    reader.abort();
}

/// Runs one command line in this process with `link` as its terminal, on `held`; answers the
/// `exit` frame. The service runs its clients' commands so; the web UI's gateway runs
/// `register` so in a home that has no service yet.
pub(crate) async fn run_linked(
    home: &Home,
    held: Arc<Held>,
    args: Vec<String>,
    link: Link,
) -> Frame {
    let link_cwd = link.cwd.clone();
    let result = term::with_link(Arc::new(link), async {
        if !plausible(&args, &link_cwd) {
            return Err(Failure::new(
                USAGE,
                "a command line with a NUL byte, or a working directory that is not absolute",
            ));
        }
        let cli = match Cli::try_parse_from(std::iter::once("kez-chat".to_owned()).chain(args)) {
            Ok(cli) => cli,
            Err(err) => {
                let text = err.render().to_string();
                return if err.use_stderr() {
                    Err(Failure::new(USAGE, text.trim_end().to_owned()))
                } else {
                    say!("{}", text.trim_end());
                    Ok(())
                };
            }
        };
        let app = App {
            config: home.config().map_err(Failure::home)?,
            home: home.clone(),
            server_flag: cli.server,
            plaintext_flag: cli.allow_plaintext,
            held,
        };
        crate::command(app, cli.command).await
    })
    .await;
    match result {
        Ok(()) => Frame::Exit {
            code: 0,
            message: None,
        },
        Err(failure) => Frame::Exit {
            code: failure.code,
            message: Some(failure.message),
        },
    }
}

/// Whether a command line could come from a real one: no NUL bytes, an absolute directory.
fn plausible(args: &[String], cwd: &Path) -> bool {
    cwd.is_absolute() && args.iter().all(|arg| !arg.contains('\0'))
}

/// The client side: runs `args` (a command line after the program name) through the home's
/// service, starting it if none runs, with this process's terminal; returns the exit code.
pub(crate) async fn run_as_client(home: &Home, args: Vec<String>) -> Result<u8, Failure> {
    let stream = connect_or_start(home).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let cwd = std::env::current_dir()
        .map_err(|err| Failure::new(USAGE, format!("cannot read the working directory: {err}")))?;
    let request = Request::Run {
        args,
        cwd,
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    send_frame(&mut write, &request)
        .await
        .map_err(|err| lost(home, err.to_string()))?;
    let mut meter: Option<(String, term::Meter)> = None;
    let mut interrupts = 0;
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|err| Failure::new(RUNTIME, format!("cannot handle SIGTERM: {err}")))?;
    loop {
        let signal = tokio::select! {
            line = read_line(&mut read) => Err(line),
            _ = tokio::signal::ctrl_c() => Ok(None),
            _ = terminate.recv() => Ok(Some("SIGTERM".to_owned())),
        };
        let line = match signal {
            Err(line) => line,
            Ok(signal) => {
                interrupts += 1;
                if interrupts > 1 {
                    return Ok(130);
                }
                send_frame(&mut write, &ClientFrame::Cancel { signal })
                    .await
                    .map_err(|err| lost(home, err.to_string()))?;
                continue;
            }
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return Err(lost(home, "it closed the connection".into())),
            Err(Frame::Refused { message, .. }) => return Err(lost(home, message)),
            Err(_) => return Err(lost(home, "unreadable answer".into())),
        };
        let frame: Frame = serde_json::from_str(&line)
            .map_err(|err| lost(home, format!("an answer that is not a frame: {err}")))?;
        match frame {
            Frame::Out(text) => term::out(text),
            Frame::Err(text) => term::err(text),
            Frame::Read { all } => {
                let text = tokio::task::spawn_blocking(move || term::read_stdin(all))
                    .await
                    .map_err(|err| Failure::new(RUNTIME, err.to_string()))?
                    .map_err(|err| Failure::new(RUNTIME, format!("cannot read stdin: {err}")))?;
                send_frame(&mut write, &ClientFrame::Input(text))
                    .await
                    .map_err(|err| lost(home, err.to_string()))?;
            }
            Frame::Progress { what, done, total } => {
                if total == 0 {
                    if let Some((_, old)) = meter.take() {
                        old.finish();
                    }
                    continue;
                }
                if meter.as_ref().is_none_or(|(name, _)| *name != what) {
                    if let Some((_, old)) = meter.take() {
                        old.finish();
                    }
                    meter = Some((what.clone(), term::Meter::new(&what, total)));
                }
                if let Some((_, meter)) = &meter {
                    meter.set(done);
                }
            }
            Frame::Exit { code, message } => {
                if let Some((_, meter)) = meter.take() {
                    meter.finish();
                }
                if let Some(message) = message {
                    tell!("kez-chat: {}", crate::display::body(&message));
                }
                return Ok(code);
            }
            Frame::Refused { code, message } => {
                return Err(Failure::new(
                    RUNTIME,
                    format!("the kez-chat service refused the command ({code}): {message}"),
                ));
            }
        }
    }
}

/// The service stopped answering mid-command.
fn lost(home: &Home, why: String) -> Failure {
    Failure::new(
        RUNTIME,
        format!(
            "lost the kez-chat service while it ran the command ({why}); see {} and run the command again",
            home.dir().join(LOG_FILE).display()
        ),
    )
}

/// Connects to the home's service, starting one when none answers.
pub(crate) async fn connect_or_start(home: &Home) -> Result<UnixStream, Failure> {
    let path = socket_path(home);
    if let Ok(stream) = UnixStream::connect(&path).await {
        return Ok(stream);
    }
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        match spawn_service(home).await? {
            Announce::Ready { .. } | Announce::Running { .. } => {}
            Announce::Failed { code, message } => return Err(Failure::new(code, message)),
        }
        // A service that is starting (ours, or one another client started a moment ago)
        // binds its socket before it announces.
        loop {
            if let Ok(stream) = UnixStream::connect(&path).await {
                return Ok(stream);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Failure::new(
                    RUNTIME,
                    format!(
                        "the kez-chat service for this home did not start within {} s; see {}",
                        START_TIMEOUT.as_secs(),
                        home.dir().join(LOG_FILE).display()
                    ),
                ));
            }
            if !home.dir().join(LOCK_FILE).exists() || !lock_held(home) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Whether a service holds the home's lock now.
pub(crate) fn lock_held(home: &Home) -> bool {
    match File::open(home.dir().join(LOCK_FILE)) {
        Ok(file) => match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(_) => true,
        },
        Err(_) => false,
    }
}

/// Starts `kez-chat service --announce` for the home, detached from this terminal and its
/// signals, and waits for its one line.
async fn spawn_service(home: &Home) -> Result<Announce, Failure> {
    let exe = std::env::current_exe()
        .map_err(|err| Failure::new(RUNTIME, format!("cannot find the kez-chat program: {err}")))?;
    let log = open_log(&home.dir().join(LOG_FILE))?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("--home")
        .arg(home.dir())
        .arg("service")
        .arg("--announce")
        .env_remove("KEZ_CHAT_SERVER")
        .env_remove("KEZ_CHAT_ALLOW_PLAINTEXT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = command.spawn().map_err(|err| {
        Failure::new(RUNTIME, format!("cannot start the kez-chat service: {err}"))
    })?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
    let failed = |why: String| {
        Failure::new(
            RUNTIME,
            format!(
                "the kez-chat service did not start ({why}); see {}",
                home.dir().join(LOG_FILE).display()
            ),
        )
    };
    let announce = match line {
        Ok(Ok(Some(line))) => serde_json::from_str::<Announce>(&line)
            .map_err(|err| failed(format!("it said {line:?}: {err}")))?,
        Ok(Ok(None)) => return Err(failed("it exited without a word".into())),
        Ok(Err(err)) => return Err(failed(err.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "no answer in {} s",
                START_TIMEOUT.as_secs()
            )));
        }
    };
    // It lives on after this process; the OS reaps it.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(announce)
}

/// The service's log, 0600, started afresh when it has grown large.
fn open_log(path: &Path) -> Result<File, Failure> {
    let large = std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > MAX_LOG_BYTES);
    let mut options = File::options();
    options.create(true).mode(0o600);
    if large {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options
        .open(path)
        .map_err(|err| Failure::new(RUNTIME, format!("cannot open {}: {err}", path.display())))
}

/// `kez-chat service status` and `service stop`.
pub(crate) async fn control(home: &Home, request: Request, json: bool) -> Result<(), Failure> {
    let stopping = matches!(request, Request::Stop {});
    let Ok(stream) = UnixStream::connect(socket_path(home)).await else {
        if stopping {
            tell!("no kez-chat service runs for this home: nothing to stop");
            return Ok(());
        }
        return Err(Failure::new(
            NOT_FOUND,
            "no kez-chat service runs for this home; any command starts one, or run `kez-chat service` in the foreground",
        ));
    };
    let (read, mut write) = stream.into_split();
    send_frame(&mut write, &request)
        .await
        .map_err(|err| lost(home, err.to_string()))?;
    let line = read_line(&mut BufReader::new(read))
        .await
        .map_err(|_| lost(home, "unreadable answer".into()))?
        .ok_or_else(|| lost(home, "no answer".into()))?;
    let status: Status = serde_json::from_str(&line)
        .map_err(|err| lost(home, format!("an answer that is not a status: {err}")))?;
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&status).expect("a status serializes")
        );
    } else if stopping {
        tell!("stopping the kez-chat service (pid {})", status.pid);
    } else {
        say!("kez-chat service {} (pid {})", status.version, status.pid);
        say!("  handle     {}", status.handle);
        say!("  home       {}", status.home.display());
        say!(
            "  server     {} ({})",
            status.server,
            if status.connected {
                "connected"
            } else {
                "not connected"
            }
        );
        say!(
            "  files      {}",
            status
                .files
                .as_deref()
                .unwrap_or("(file node not started yet)")
        );
        say!("  since      {}", crate::clock(status.since));
        say!("  running    {} other command(s)", status.running);
    }
    if stopping {
        // Until it has let go of the home.
        let deadline = tokio::time::Instant::now() + STOP_GRACE * 3;
        while lock_held(home) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
