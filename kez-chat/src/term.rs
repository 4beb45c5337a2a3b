//! The terminal of one command: this process's own, or, for a command the service runs for a
//! client (`service.rs`), that client's, reached over the local API.
//!
//! Command code prints with [`say!`] (stdout) and [`tell!`]/[`tell_part!`] (stderr), reads
//! with [`read_line`]/[`read_all`], waits for Ctrl-C with [`interrupted`], resolves the
//! paths a person typed with [`path`] and shows progress with [`Meter`]; it never touches the
//! process's stdio directly, so the same code serves both. Which terminal is the task-local
//! [`Link`], set by the service around each request it runs.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{Mutex, mpsc, watch};

use crate::failure::{Failure, RUNTIME};
use crate::local::Frame;

/// How many progress lines a long step prints when stderr is not a terminal.
const PROGRESS_LINES: u64 = 10;
/// How many progress frames a long step sends a client at most (it draws the bar itself).
const PROGRESS_FRAMES: u64 = 200;

tokio::task_local! {
    static LINK: Arc<Link>;
}

/// A client's terminal, as the service sees it while it runs one of the client's commands.
pub(crate) struct Link {
    /// Frames to the client, in order.
    pub(crate) frames: mpsc::UnboundedSender<Frame>,
    /// What the client typed when asked (`None`: end of its input).
    pub(crate) input: Mutex<mpsc::UnboundedReceiver<Option<String>>>,
    /// Becomes `Some` when the client pressed Ctrl-C (`"Ctrl-C"`), was terminated
    /// (`"SIGTERM"`) or went away.
    pub(crate) cancelled: watch::Receiver<Option<&'static str>>,
    /// The client's working directory: relative paths it typed are relative to it.
    pub(crate) cwd: PathBuf,
    /// Whether the client's stderr is a terminal (bars and countdowns, not lines).
    pub(crate) tty: bool,
}

/// Runs `work` with `link` as its terminal.
pub(crate) async fn with_link<F: Future>(link: Arc<Link>, work: F) -> F::Output {
    LINK.scope(link, work).await
}

fn link() -> Option<Arc<Link>> {
    LINK.try_with(Arc::clone).ok()
}

/// Writes `text` to the command's stdout.
pub(crate) fn out(text: String) {
    match link() {
        Some(link) => {
            let _ = link.frames.send(Frame::Out(text));
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    }
}

/// Writes `text` to the command's stderr.
pub(crate) fn err(text: String) {
    match link() {
        Some(link) => {
            let _ = link.frames.send(Frame::Err(text));
        }
        None => {
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(text.as_bytes());
            let _ = stderr.flush();
        }
    }
}

/// Prints a line to the command's stdout, like `println!`.
macro_rules! say {
    () => { $crate::term::out(String::from("\n")) };
    ($($arg:tt)*) => { $crate::term::out(format!("{}\n", format_args!($($arg)*))) };
}

/// Prints a line to the command's stderr, like `eprintln!`.
macro_rules! tell {
    () => { $crate::term::err(String::from("\n")) };
    ($($arg:tt)*) => { $crate::term::err(format!("{}\n", format_args!($($arg)*))) };
}

/// Prints to the command's stderr without a newline, like `eprint!` (a prompt, a countdown).
macro_rules! tell_part {
    ($($arg:tt)*) => { $crate::term::err(format!($($arg)*)) };
}

pub(crate) use {say, tell, tell_part};

/// Whether the command's stderr is a terminal.
pub(crate) fn is_terminal() -> bool {
    match link() {
        Some(link) => link.tty,
        None => std::io::stderr().is_terminal(),
    }
}

/// `path` as the person who typed it meant it: relative to their working directory.
pub(crate) fn path(path: &Path) -> PathBuf {
    match link() {
        Some(link) if path.is_relative() => link.cwd.join(path),
        _ => path.to_path_buf(),
    }
}

/// Reads one line from the command's stdin (without its line end); `None` at its end.
pub(crate) async fn read_line() -> Result<Option<String>, Failure> {
    read(false).await
}

/// Reads the command's whole stdin.
pub(crate) async fn read_all() -> Result<String, Failure> {
    Ok(read(true).await?.unwrap_or_default())
}

async fn read(all: bool) -> Result<Option<String>, Failure> {
    let cannot = |err: String| Failure::new(RUNTIME, format!("cannot read stdin: {err}"));
    match link() {
        Some(link) => {
            let mut input = link.input.lock().await;
            link.frames
                .send(Frame::Read { all })
                .map_err(|_| cannot("the client went away".into()))?;
            match input.recv().await {
                Some(answer) => Ok(answer),
                None => Err(cannot("the client went away".into())),
            }
        }
        None => tokio::task::spawn_blocking(move || read_stdin(all))
            .await
            .map_err(|err| cannot(err.to_string()))?
            .map_err(|err| cannot(err.to_string())),
    }
}

/// Reads this process's stdin: a line (without its line end, `None` at the end) or all of it.
pub(crate) fn read_stdin(all: bool) -> std::io::Result<Option<String>> {
    let mut text = String::new();
    if all {
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(Some(text));
    }
    if std::io::stdin().read_line(&mut text)? == 0 {
        return Ok(None);
    }
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
}

/// Resolves when the person stops the command — Ctrl-C or SIGTERM here, or the client's Ctrl-C
/// or disconnect for a command the service runs — naming which.
pub(crate) async fn interrupted() -> &'static str {
    if let Some(link) = link() {
        let mut cancelled = link.cancelled.clone();
        let heard = cancelled
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|signal| *signal);
        return match heard {
            Some(signal) => signal,
            // The service keeps the sender while the request runs.
            None => std::future::pending().await,
        };
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

/// Progress for long work: a bar with bytes and rate on a terminal; otherwise a line at every
/// 10% (`downloading: 12.0 MiB of 50.0 MiB`), so logs and scripts see it too. For a client of
/// the service, progress frames that the client draws the same way.
pub(crate) struct Meter {
    show: Show,
    what: String,
    total: u64,
    next: AtomicU64,
}

enum Show {
    Bar(ProgressBar),
    Lines,
    Frames(Arc<Link>),
}

impl Meter {
    /// A meter of `total` bytes for the step `what`.
    pub(crate) fn new(what: &str, total: u64) -> Meter {
        let show = match link() {
            Some(link) => Show::Frames(link),
            None if std::io::stderr().is_terminal() => Show::Bar(bar(what, total)),
            None => Show::Lines,
        };
        Meter {
            show,
            what: what.to_owned(),
            total,
            next: AtomicU64::new(0),
        }
    }

    /// `done` bytes of the total are done.
    pub(crate) fn set(&self, done: u64) {
        match &self.show {
            Show::Bar(bar) => bar.set_position(done),
            Show::Lines => {
                if done >= self.next.load(Ordering::Relaxed) {
                    self.next.store(
                        done + (self.total / PROGRESS_LINES).max(1),
                        Ordering::Relaxed,
                    );
                    tell!(
                        "{}: {} of {}",
                        self.what,
                        crate::files::bytes(done),
                        crate::files::bytes(self.total)
                    );
                }
            }
            Show::Frames(link) => {
                if done >= self.next.load(Ordering::Relaxed) || done == self.total {
                    self.next.store(
                        done + (self.total / PROGRESS_FRAMES).max(1),
                        Ordering::Relaxed,
                    );
                    let _ = link.frames.send(Frame::Progress {
                        what: self.what.clone(),
                        done,
                        total: self.total,
                    });
                }
            }
        }
    }

    /// The step is over (done or not): the bar goes away.
    pub(crate) fn finish(&self) {
        match &self.show {
            Show::Bar(bar) => bar.finish_and_clear(),
            Show::Lines => {}
            Show::Frames(link) => {
                let _ = link.frames.send(Frame::Progress {
                    what: String::new(),
                    done: 0,
                    total: 0,
                });
            }
        }
    }
}

/// A byte bar for the step `what`.
pub(crate) fn bar(what: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}
