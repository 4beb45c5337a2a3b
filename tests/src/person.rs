//! A person using the `kez-chat` binary: a client home in a temporary directory and helpers to
//! run commands in it, as separate processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kez_core::SecretKey;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::callout::run_to_completion;
use crate::process::kez_chat_binary;

/// A client home in a temporary directory.
pub struct Person {
    /// The home directory (`--home`).
    pub home: PathBuf,
    _dir: TempDir,
}

impl Default for Person {
    fn default() -> Person {
        Person::new()
    }
}

impl Person {
    /// A new, empty home.
    pub fn new() -> Person {
        let dir = tempfile::tempdir().unwrap();
        Person {
            home: dir.path().join("home"),
            _dir: dir,
        }
    }

    /// Runs `kez-chat --home <home> args…` (no `--server`: the config's is used).
    pub async fn run(&self, args: &[&str]) -> Output {
        run_to_completion(kez_chat(&self.home, args)).await
    }

    /// [`Person::run`], which must succeed; answers stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "kez-chat {args:?} failed ({:?}):\n{}\nthe service's log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.service_log()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// [`Person::ok`] with `--json`, parsed.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.ok(&args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }

    /// Runs a command that must fail with `code`; answers stderr.
    pub async fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args).await;
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(
            output.status.code(),
            Some(code),
            "kez-chat {args:?}: stdout {:?}, stderr {stderr}\nthe service's log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            self.service_log()
        );
        stderr
    }

    /// Runs `kez-chat --home <home> args…` with `input` on its stdin.
    pub async fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut command = tokio::process::Command::from(kez_chat(&self.home, args));
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("kez-chat finishes within 30 s")
            .unwrap()
    }

    /// The log of the home's service (what it said while it ran in the background).
    pub fn service_log(&self) -> String {
        std::fs::read_to_string(self.home.join("service.log")).unwrap_or_default()
    }

    /// Stops the home's kez-chat service (if one runs) and waits until it has let go of the
    /// home: for a test that reads or damages the store itself.
    pub async fn stop_service(&self) {
        self.ok(&["service", "stop"]).await;
    }

    /// `register <name>` against `server`.
    pub async fn register(&self, server: &str, name: &str) -> String {
        self.ok(&["--server", server, "register", name, "--no-paper-key"])
            .await
    }
}

/// A `kez-chat --home <home> args…` command, isolated from the developer's environment.
pub fn kez_chat(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(kez_chat_binary());
    command
        .env_remove("KEZ_CHAT_HOME")
        .env_remove("KEZ_CHAT_SERVER")
        .env_remove("KEZ_CHAT_ALLOW_PLAINTEXT")
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null());
    command
}

/// Runs `kez-chat args…` in `person`'s home, reads the paper key it shows on stdout, and types
/// back the word it asks for; answers the words and everything it printed. The run must succeed.
pub async fn type_back_a_paper_key(person: &Person, args: &[&str]) -> (Vec<String>, String) {
    let home = person.home.clone();
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Read, Write};
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = kez_chat(&home, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut shown = String::new();
        let mut words = Vec::new();
        while words.len() < 24 {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "{shown}");
            shown.push_str(&line);
            if line.starts_with("  ") {
                let tokens: Vec<&str> = line.split_whitespace().collect();
                for pair in tokens.chunks(2) {
                    assert_eq!(pair[0], (words.len() + 1).to_string(), "{line}");
                    words.push(pair[1].to_owned());
                }
            }
        }
        let mut stderr = child.stderr.take().unwrap();
        let mut prompt = Vec::new();
        let mut byte = [0u8];
        while !prompt.ends_with(b"wrote them down: ") {
            assert_eq!(stderr.read(&mut byte).unwrap(), 1, "{prompt:?}");
            prompt.push(byte[0]);
        }
        let prompt = String::from_utf8(prompt).unwrap();
        let position: usize = prompt
            .split("Type word ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|number| number.parse().ok())
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", words[position - 1]).unwrap();
        drop(stdin);
        stdout.read_to_string(&mut shown).unwrap();
        assert!(child.wait().unwrap().success(), "{shown}");
        (words, shown)
    })
    .await
    .unwrap()
}

/// Registers alice and bob through the CLI and makes each the other's contact.
pub async fn alice_and_bob(url: &str) -> (Person, Person) {
    let alice = Person::new();
    let bob = Person::new();
    alice.register(url, "alice").await;
    bob.register(url, "bob").await;
    alice.ok(&["add", "@bob"]).await;
    bob.ok(&["add", "@alice"]).await;
    (alice, bob)
}

/// `person`'s key, read from their home.
pub fn key_of(person: &Person) -> Arc<SecretKey> {
    Arc::new(kez_client::Home::open(&person.home).unwrap().key().unwrap())
}

/// A marker that appears many times in the plaintext: no store may contain it.
pub const MARKER: &[u8] = b"KEZ-PLAINTEXT-MARKER-a8f3";

/// Writes a file of `size` bytes: the marker every 4 KiB, pseudo-random bytes in between.
pub fn plaintext_file(path: &Path, size: usize) {
    let mut bytes = Vec::with_capacity(size);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while bytes.len() < size {
        if bytes.len() % 4096 == 0 {
            bytes.extend_from_slice(MARKER);
        } else {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.push(state as u8);
        }
    }
    bytes.truncate(size);
    std::fs::write(path, bytes).unwrap();
}

/// Whether any file under `dir` contains `needle`.
pub fn tree_contains(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files += 1;
                let bytes = std::fs::read(&path).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
    }
    assert!(files > 0, "{} holds no files", dir.display());
    false
}

/// Starts `listen` for `person` and waits until it serves files.
pub async fn serving(person: &Person) -> Child {
    let mut command = tokio::process::Command::from(kez_chat(&person.home, &["listen"]));
    command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("serving your shared files") {
                return;
            }
        }
        panic!("listen ended before serving");
    })
    .await
    .expect("listen serves within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Stops a `listen` started by [`serving`] with Ctrl-C; it must exit cleanly.
pub async fn stop(mut child: Child) {
    let pid = child.id().expect("running") as i32;
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stops on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
