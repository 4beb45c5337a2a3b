//! The storm's clients, in processes of their own (`kez-bench storm-clients`, started by the
//! storm section): async-nats keeps a lost connection's socket until its next connect
//! succeeds, so in a storm each client holds two open files. In one process, 16,000 clients
//! filled this machine's 20,000 for seconds: their connect attempts failed at once ("Too many
//! open files", which async-nats reports as an I/O error like a refused connect), so kez-client
//! backed off as from a broker that is down, and the storm's last seconds were the harness's.
//! Each process holds at most as many clients as its own open-file limit allows.
//!
//! The section drives each process by lines on its standard input, answered on its standard
//! output: see [`Command`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::{Client, Event};
use kez_core::SecretKey;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long the round trip that confirms a client is back may take.
const CONFIRM_WITHIN: Duration = Duration::from_secs(10);
/// How often a client's first connect is tried before the section fails.
const FIRST_CONNECT_ATTEMPTS: usize = 5;
/// How long a command other than `connect` and `confirm` may take to be answered.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// How long a process may take to connect its clients, or to confirm them.
const CONNECT_WITHIN: Duration = Duration::from_secs(600);

/// Which reconnect delays the clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// kez-client's own ([`kez_client::reconnect`]).
    Kez,
    /// async-nats' default, what kez-client used before: the first attempt at once, then
    /// 2 ms doubling up to 4 s, the same for every client.
    AsyncNats,
}

impl Backoff {
    fn name(self) -> &'static str {
        match self {
            Backoff::Kez => "kez",
            Backoff::AsyncNats => "async-nats",
        }
    }

    fn named(name: &str) -> Option<Backoff> {
        [Backoff::Kez, Backoff::AsyncNats]
            .into_iter()
            .find(|backoff| backoff.name() == name)
    }
}

/// The commands a clients process takes, one per line, and what it answers.
enum Command {
    /// `connect <url> <backoff>`: connects every client (first connects, a few at a time);
    /// answers `connected`.
    Connect(String, Backoff),
    /// `window`: reads the reconnect window the server advertises over one client, which the
    /// process's kez reconnect delays follow from then on ([`kez_client::reconnect`]); answers
    /// `window <ms>`, or `window none` when none is advertised.
    Window,
    /// `stop`: the broker is being stopped now, connects from here on are reconnects; no
    /// answer.
    Stop,
    /// `back`: answers `back <n>`, the clients connected since the stop.
    Back,
    /// `confirm`: one round trip per client (a PONG comes only once a connection is
    /// authorized); answers `all <failed> <back>/<wait>...` with, per client, its time back
    /// (since the stop, in nanoseconds, in order) and how long its last attempt took until
    /// then (nanoseconds: the broker's greeting and the callout's decision, queued behind the
    /// others'), and the connect attempts that failed after the stop (other than a refused TCP
    /// connect while the broker was down), or `back <n>` when not all are.
    Confirm,
    /// `close`: closes every client; answers `closed`.
    Close,
}

impl Command {
    fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["connect", url, backoff] => Backoff::named(backoff)
                .map(|backoff| Command::Connect((*url).to_owned(), backoff))
                .ok_or_else(|| format!("no backoff named {backoff:?}")),
            ["window"] => Ok(Command::Window),
            ["stop"] => Ok(Command::Stop),
            ["back"] => Ok(Command::Back),
            ["confirm"] => Ok(Command::Confirm),
            ["close"] => Ok(Command::Close),
            _ => Err(format!("not a command: {line:?}")),
        }
    }
}

/// Client `index`'s key: derived from the run's `base` seed, so that the section (which
/// registers the users) and the process holding the client agree on it without handing keys
/// around.
pub fn client_key(base: &[u8; 32], index: usize) -> SecretKey {
    let mut seed = *base;
    for (byte, index_byte) in seed.iter_mut().zip((index as u64).to_le_bytes()) {
        *byte ^= index_byte;
    }
    SecretKey::from_seed(&seed)
}

/// The clients processes of one section run; killed when dropped.
pub struct ClientProcesses {
    processes: Vec<ClientProcess>,
}

struct ClientProcess {
    child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
}

impl ClientProcess {
    async fn send(&mut self, command: &str) -> Result<(), String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| format!("a clients process is gone ({e})"))
    }

    async fn answer(&mut self, within: Duration) -> Result<String, String> {
        match tokio::time::timeout(within, self.answers.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => Err("a clients process ended (its error is above)".to_owned()),
            Ok(Err(e)) => Err(format!("reading a clients process: {e}")),
            Err(_) => Err(format!(
                "a clients process did not answer within {within:?}"
            )),
        }
    }
}

impl ClientProcesses {
    /// Starts `processes` processes sharing `clients` clients, whose keys derive from `base`.
    pub async fn start(
        base: &[u8; 32],
        clients: usize,
        processes: usize,
        concurrency: usize,
    ) -> Result<ClientProcesses, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find kez-bench itself: {e}"))?;
        let per_process = clients.div_ceil(processes.max(1));
        let concurrency = concurrency.div_ceil(processes.max(1)).to_string();
        let seed: String = base.iter().map(|byte| format!("{byte:02x}")).collect();
        let mut started = Vec::new();
        for first in (0..clients).step_by(per_process.max(1)) {
            let count = per_process.min(clients - first);
            let mut child = tokio::process::Command::new(&exe)
                .arg("storm-clients")
                .args(["--first", &first.to_string(), "--count", &count.to_string()])
                .args(["--concurrency", &concurrency])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start a clients process: {e}"))?;
            let mut process = ClientProcess {
                stdin: child.stdin.take().expect("piped stdin"),
                answers: BufReader::new(child.stdout.take().expect("piped stdout")).lines(),
                child,
            };
            // The seed goes through the pipe, not the command line other users can read.
            process.send(&seed).await?;
            started.push(process);
        }
        Ok(ClientProcesses { processes: started })
    }

    /// The processes' ids, for their CPU time.
    pub fn pids(&self) -> Vec<u32> {
        self.processes
            .iter()
            .filter_map(|process| process.child.id())
            .collect()
    }

    /// Sends `command` to every process, then reads each one's answer.
    async fn ask(&mut self, command: &str, within: Duration) -> Result<Vec<String>, String> {
        for process in &mut self.processes {
            process.send(command).await?;
        }
        let mut answers = Vec::with_capacity(self.processes.len());
        for process in &mut self.processes {
            answers.push(process.answer(within).await?);
        }
        Ok(answers)
    }

    /// Connects every client through `url` with `backoff`'s reconnect delays.
    pub async fn connect(&mut self, url: &str, backoff: Backoff) -> Result<(), String> {
        let command = format!("connect {url} {}", backoff.name());
        for answer in self.ask(&command, CONNECT_WITHIN).await? {
            if answer != "connected" {
                return Err(format!("a clients process could not connect: {answer}"));
            }
        }
        Ok(())
    }

    /// Has every process learn the reconnect window the server advertises; answers it (the
    /// same for all), `None` when none is advertised.
    pub async fn learn_window(&mut self) -> Result<Option<Duration>, String> {
        let answers = self.ask("window", ANSWER_WITHIN).await?;
        let windows: Vec<Option<Duration>> = answers
            .iter()
            .map(|answer| parse_window(answer))
            .collect::<Result<_, _>>()?;
        match windows.first() {
            Some(first) if windows.iter().all(|window| window == first) => Ok(*first),
            _ => Err(format!(
                "the clients processes learnt different windows: {answers:?}"
            )),
        }
    }

    /// Tells every process the broker is being stopped.
    pub async fn stop(&mut self) -> Result<(), String> {
        for process in &mut self.processes {
            process.send("stop").await?;
        }
        Ok(())
    }

    /// How many clients are connected since the stop.
    pub async fn back(&mut self) -> Result<usize, String> {
        self.ask("back", ANSWER_WITHIN)
            .await?
            .iter()
            .map(|answer| count_back(answer))
            .sum()
    }

    /// Every client's time back since the stop and its last attempt's wait, in the order they
    /// came back, and the failed connect attempts; `None` unless all are back, confirmed by a
    /// round trip.
    pub async fn confirm(&mut self) -> Result<Option<(Vec<Returned>, usize)>, String> {
        let mut back = Vec::new();
        let mut failed = 0;
        for answer in self.ask("confirm", CONNECT_WITHIN).await? {
            let Some(all) = answer.strip_prefix("all ") else {
                count_back(&answer)?;
                return Ok(None);
            };
            let mut words = all.split_whitespace();
            failed += words
                .next()
                .and_then(|count| count.parse::<u64>().ok())
                .ok_or_else(|| format!("not an answer to confirm: {answer:.80}"))?;
            for pair in words {
                back.push(parse_returned(pair)?);
            }
        }
        back.sort_unstable_by_key(|returned| returned.back);
        Ok(Some((back, usize::try_from(failed).unwrap_or(usize::MAX))))
    }

    /// Closes every client.
    pub async fn close(&mut self) -> Result<(), String> {
        for answer in self.ask("close", ANSWER_WITHIN).await? {
            if answer != "closed" {
                return Err(format!("a clients process could not close: {answer}"));
            }
        }
        Ok(())
    }
}

/// One client's return after the stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Returned {
    /// When it was back, since the stop.
    pub back: Duration,
    /// How long its last connect attempt took: from the end of its reconnect wait until the
    /// broker let it in.
    pub wait: Duration,
}

fn parse_returned(pair: &str) -> Result<Returned, String> {
    let (back, wait) = pair
        .split_once('/')
        .and_then(|(back, wait)| Some((back.parse().ok()?, wait.parse().ok()?)))
        .ok_or_else(|| format!("not a client's return: {pair:.40}"))?;
    Ok(Returned {
        back: Duration::from_nanos(back),
        wait: Duration::from_nanos(wait),
    })
}

fn parse_window(answer: &str) -> Result<Option<Duration>, String> {
    match answer.strip_prefix("window ") {
        Some("none") => Ok(None),
        Some(millis) => millis
            .parse()
            .map(|millis| Some(Duration::from_millis(millis)))
            .map_err(|_| format!("not an answer to window: {answer:.80}")),
        None => Err(format!("not an answer to window: {answer:.80}")),
    }
}

fn count_back(answer: &str) -> Result<usize, String> {
    answer
        .strip_prefix("back ")
        .and_then(|count| count.parse().ok())
        .ok_or_else(|| format!("not an answer to back: {answer:.80}"))
}

/// What the clients' event callbacks saw.
struct Tally {
    /// When the broker was stopped: connects from then on are reconnects.
    stopped_at: OnceLock<Instant>,
    /// Per client, when it was last connected after the stop (nanoseconds since the stop, plus
    /// one); 0 while it is not. A connection async-nats calls connected may still be refused:
    /// it takes any first answer to its CONNECT for the broker's PONG, the broker's own PING
    /// too, which comes while the callout decides; then the refusal disconnects it again.
    back: Box<[AtomicU64]>,
    /// Per client, when its latest connect attempt after the stop began (its reconnect wait
    /// over; nanoseconds since the stop, plus one); 0 before the first.
    attempted: Box<[AtomicU64]>,
    /// Connect attempts that failed after the stop, other than while the broker was down.
    failed: AtomicUsize,
}

impl Tally {
    fn new(clients: usize) -> Tally {
        Tally {
            stopped_at: OnceLock::new(),
            back: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            attempted: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicUsize::new(0),
        }
    }

    /// How many clients are connected since the stop.
    fn back(&self) -> usize {
        self.back
            .iter()
            .filter(|at| at.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// Nanoseconds since the stop, plus one.
    fn since_stop(&self, later: Duration) -> Option<u64> {
        let since = self.stopped_at.get()?.elapsed() + later;
        Some(
            u64::try_from(since.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_add(1),
        )
    }

    /// When each client was last connected and how long its last attempt took until then, in
    /// nanoseconds; `None` unless all are connected.
    fn all_back(&self) -> Option<Vec<(u64, u64)>> {
        self.back
            .iter()
            .zip(self.attempted.iter())
            .map(|(back, attempted)| {
                let back = back.load(Ordering::Relaxed).checked_sub(1)?;
                let attempted = attempted.load(Ordering::Relaxed).saturating_sub(1);
                Some((back, back.saturating_sub(attempted)))
            })
            .collect()
    }
}

/// `kez-bench storm-clients`: holds clients `first..first + count` (their keys derived from
/// the seed read first, as hex, from standard input) and answers the [`Command`]s that follow,
/// until standard input ends.
pub async fn serve(first: usize, count: usize, concurrency: usize) -> Result<(), String> {
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let seed_hex = commands
        .next_line()
        .await
        .map_err(|e| format!("reading the seed: {e}"))?
        .ok_or("no seed on standard input")?;
    let base = parse_seed(&seed_hex)?;
    let keys: Arc<[Arc<SecretKey>]> = (first..first + count)
        .map(|index| Arc::new(client_key(&base, index)))
        .collect();
    let mut tally = Arc::new(Tally::new(count));
    let connected: Arc<Mutex<Vec<Client>>> = Arc::new(Mutex::new(Vec::with_capacity(count)));
    while let Some(line) = commands
        .next_line()
        .await
        .map_err(|e| format!("reading a command: {e}"))?
    {
        let answer = match Command::parse(&line)? {
            Command::Connect(url, backoff) => {
                tally = Arc::new(Tally::new(count));
                connect_all(&url, &keys, first, concurrency, &tally, &connected, backoff).await?;
                Some("connected".to_owned())
            }
            Command::Window => {
                let client = connected.lock().expect("no holder panics").first().cloned();
                let client = client.ok_or("no client connected to read the window over")?;
                Some(match kez_client::reconnect::learn_window(&client).await? {
                    Some(window) => format!("window {}", window.as_millis()),
                    None => "window none".to_owned(),
                })
            }
            Command::Stop => {
                tally
                    .stopped_at
                    .set(Instant::now())
                    .map_err(|_| "stopped twice in one storm")?;
                None
            }
            Command::Back => Some(format!("back {}", tally.back())),
            Command::Confirm => Some(confirm(&tally, &connected).await),
            Command::Close => {
                let clients = std::mem::take(&mut *connected.lock().expect("no holder panics"));
                drop(clients);
                Some("closed".to_owned())
            }
        };
        if let Some(answer) = answer {
            out.write_all(format!("{answer}\n").as_bytes())
                .await
                .map_err(|e| format!("answering: {e}"))?;
            out.flush().await.map_err(|e| format!("answering: {e}"))?;
        }
    }
    Ok(())
}

fn parse_seed(hex: &str) -> Result<[u8; 32], String> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|at| {
            hex.get(at..at + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or("the seed is not hex")?;
    bytes
        .try_into()
        .map_err(|_| "the seed is not 32 bytes".to_owned())
}

async fn connect_all(
    url: &str,
    keys: &Arc<[Arc<SecretKey>]>,
    first: usize,
    concurrency: usize,
    tally: &Arc<Tally>,
    connected: &Arc<Mutex<Vec<Client>>>,
    backoff: Backoff,
) -> Result<(), String> {
    crate::storm::in_parallel(keys.len(), concurrency, |index| {
        let (key, tally, connected) = (keys[index].clone(), tally.clone(), connected.clone());
        async move {
            // On a machine busy with other work a first connect can miss nats-server's
            // authorization timeout too (the previous storm's clients are still being
            // closed): asked again, as `Connection::connect_with` does. Only the storm is
            // measured.
            let mut attempts = 0;
            let client = loop {
                match connect(url, &key, index, first + index, tally.clone(), backoff).await {
                    Ok(client) => break client,
                    Err(err) if attempts < FIRST_CONNECT_ATTEMPTS => {
                        attempts += 1;
                        eprintln!("storm: connecting st{} again: {err}", first + index);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(err) => return Err(format!("connecting st{}: {err}", first + index)),
                }
            };
            connected.lock().expect("no holder panics").push(client);
            Ok(())
        }
    })
    .await
}

/// `confirm`'s answer.
async fn confirm(tally: &Tally, connected: &Mutex<Vec<Client>>) -> String {
    if tally.back() == tally.back.len() {
        // Every client says it is connected: one round trip each shows whether the broker
        // agrees (a refusal after `Connected` takes the client out of the tally again).
        let everyone: Vec<Client> = connected.lock().expect("no holder panics").clone();
        futures::future::join_all(
            everyone
                .iter()
                .map(|client| tokio::time::timeout(CONFIRM_WITHIN, client.flush())),
        )
        .await;
    }
    match tally.all_back() {
        Some(mut back) => {
            back.sort_unstable();
            let mut answer = format!("all {}", tally.failed.load(Ordering::Relaxed));
            for (nanos, wait) in back {
                write!(answer, " {nanos}/{wait}").expect("writing to a String");
            }
            answer
        }
        None => format!("back {}", tally.back()),
    }
}

/// Connects as `key`, this process's client `slot` (`index` of all), with kez-client's own
/// options, reporting to `tally`.
async fn connect(
    url: &str,
    key: &Arc<SecretKey>,
    slot: usize,
    index: usize,
    tally: Arc<Tally>,
    backoff: Backoff,
) -> Result<Client, String> {
    // kez-client's pacing (or async-nats' delays), noting when each attempt begins (its wait
    // over).
    let pacing = Arc::new(kez_client::reconnect::Pacing::default());
    let (delays, noted, noting) = (pacing.clone(), tally.clone(), pacing.clone());
    pacing
        .pace(kez_client::Connection::options(key))
        .reconnect_delay_callback(move |attempts| {
            let wait = match backoff {
                Backoff::Kez => delays.delay(attempts),
                Backoff::AsyncNats => async_nats_delay(attempts),
            };
            if let Some(at) = noted.since_stop(wait) {
                noted.attempted[slot].store(at, Ordering::Relaxed);
            }
            wait
        })
        .local_address(source_address(index))
        .event_callback(move |event| {
            noting.note(&event);
            let tally = tally.clone();
            async move {
                let Some(stopped_at) = tally.stopped_at.get() else {
                    return;
                };
                let at = &tally.back[slot];
                match event {
                    Event::Connected => {
                        let since =
                            u64::try_from(stopped_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        at.store(since.saturating_add(1), Ordering::Relaxed);
                    }
                    Event::Disconnected => at.store(0, Ordering::Relaxed),
                    // A refused TCP connect (the broker is down: `IO error`) is not counted.
                    Event::ClientError(async_nats::ClientError::Other(why))
                        if why != "IO error" =>
                    {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    // A refusal of a connection async-nats had taken for established.
                    Event::ServerError(_) => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| e.to_string())
}

/// The loopback address client `index` connects from (port chosen by the kernel): one per
/// client, as clients on other machines would have. From one address, 10,000 connections to
/// the same broker port fill its ephemeral port range, and every connect then searches it for
/// a free port (12 % of the storm's CPU, all the harness's, before this).
fn source_address(index: usize) -> std::net::SocketAddr {
    let [_, high, middle, low] = u32::try_from(index)
        .unwrap_or(u32::MAX)
        .saturating_add(1 << 16)
        .min(0x00ff_fffe)
        .to_be_bytes();
    std::net::SocketAddr::from(([127, high, middle, low], 0))
}

/// async-nats' default reconnect delay (its `reconnect_delay_callback_default`, not public).
fn async_nats_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        Duration::ZERO
    } else {
        let doublings = u32::try_from(attempts - 1).unwrap_or(u32::MAX);
        Duration::from_millis(2_u64.saturating_pow(doublings)).min(Duration::from_secs(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_differ_by_index_and_agree_across_processes() {
        let base = [7u8; 32];
        let keys: Vec<_> = (0..300)
            .map(|index| client_key(&base, index).public_key())
            .collect();
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        assert_eq!(client_key(&base, 299).public_key(), keys[299]);
        assert_ne!(client_key(&[8u8; 32], 0).public_key(), keys[0]);
    }

    #[test]
    fn the_seed_goes_through_hex_and_back() {
        let base: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let hex: String = base.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(parse_seed(&hex), Ok(base));
        assert!(parse_seed("zz").is_err());
        assert!(parse_seed(&hex[..62]).is_err());
    }

    #[test]
    fn commands_are_read_and_others_refused() {
        assert!(matches!(
            Command::parse("connect nats://127.0.0.1:4 kez"),
            Ok(Command::Connect(url, Backoff::Kez)) if url == "nats://127.0.0.1:4"
        ));
        assert!(matches!(
            Command::parse("connect u async-nats"),
            Ok(Command::Connect(_, Backoff::AsyncNats))
        ));
        assert!(Command::parse("connect u other").is_err());
        assert!(matches!(Command::parse("confirm"), Ok(Command::Confirm)));
        assert!(matches!(Command::parse("window"), Ok(Command::Window)));
        assert!(Command::parse("reboot").is_err());
    }

    #[test]
    fn answers_are_counted() {
        assert_eq!(count_back("back 12"), Ok(12));
        assert!(count_back("all 0 1 2").is_err());
        assert_eq!(
            parse_returned("3000000000/250000000"),
            Ok(Returned {
                back: Duration::from_secs(3),
                wait: Duration::from_millis(250),
            })
        );
        assert!(parse_returned("3000000000").is_err());
        assert!(parse_returned("3/x").is_err());
        assert_eq!(
            parse_window("window 8000"),
            Ok(Some(Duration::from_secs(8)))
        );
        assert_eq!(parse_window("window none"), Ok(None));
        assert!(parse_window("window 8 s").is_err());
        assert!(parse_window("back 3").is_err());
    }
}
