//! The local API between `kez-chat` clients and the home's service (PROTOCOL.md §12): JSON
//! lines over the Unix socket `<home>/service.sock`. Both sides use these types.
//!
//! A connection carries one [`Request`]; for `run`, the service then streams [`Frame`]s (the
//! command's output, reads of its input, progress) and the client answers reads with
//! [`ClientFrame`]s, until the final `exit` frame.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The socket's file name in the home.
pub const SOCKET_FILE: &str = "service.sock";
/// The lock the running service holds (its pid inside), in the home.
pub const LOCK_FILE: &str = "service.lock";
/// Where a service the CLI started writes its log, in the home.
pub const LOG_FILE: &str = "service.log";
/// The largest line either side accepts, in bytes (a request carries at most a command line;
/// an input line at most a message's text).
pub const MAX_LINE: usize = 1 << 20;

/// The first line a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Run one CLI command, as `kez-chat ARGS…` would in this home.
    Run {
        /// The command line after the program name (global flags included).
        args: Vec<String>,
        /// The client's working directory (absolute): relative paths are relative to it.
        cwd: PathBuf,
        /// Whether the client's stderr is a terminal (progress as a bar, countdowns).
        tty: bool,
    },
    /// The service's state: answered with one [`Status`] line.
    Status {},
    /// Stop the service: answered with one [`Status`] line, then it stops.
    Stop {},
}

/// What a client sends after a `run` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// The answer to a `read` frame: the text, or `null` at the end of the input.
    Input(Option<String>),
    /// Ctrl-C (or another stop signal, named): the command stops as it would on a terminal.
    Cancel {
        /// `SIGTERM` for a termination; absent for Ctrl-C.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
}

/// What the service sends while it runs a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Frame {
    /// Text for the client's stdout, exactly (line ends included).
    Out(String),
    /// Text for the client's stderr, exactly.
    Err(String),
    /// The command reads its input: one line (`all: false`) or all of it.
    Read {
        /// Whether to read to the end.
        all: bool,
    },
    /// Progress of a long step, `done` of `total` bytes; `total` 0 ends the step's bar.
    Progress {
        /// What the step does, e.g. `downloading`.
        what: String,
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// The command ended with this exit code (`message`: why it failed, for people).
    Exit {
        /// The exit code (`kez-chat --help` lists them).
        code: u8,
        /// The failure's message, when `code` is not 0.
        message: Option<String>,
    },
    /// The request was refused before any command ran (stable `code`, see PROTOCOL.md §12).
    Refused {
        /// `malformed`, `too_large`, `not_owner` or `stopping`.
        code: String,
        /// Why, for people.
        message: String,
    },
}

/// The answer to `status` and `stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The service's process id.
    pub pid: u32,
    /// The kez-chat version it runs.
    pub version: String,
    /// The own handle.
    pub handle: String,
    /// The home directory.
    pub home: PathBuf,
    /// The server URL it connects to.
    pub server: String,
    /// Whether it is connected to the broker now.
    pub connected: bool,
    /// The provider string at which it serves the user's files, once its file node runs.
    pub files: Option<String>,
    /// When it started (Unix seconds).
    pub since: u64,
    /// How many commands it is running now.
    pub running: usize,
}

/// What a service started by a client prints as its one stdout line (`service --announce`):
/// ready, or why it could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Announce {
    /// Listening on the socket.
    Ready {
        /// Its process id.
        pid: u32,
    },
    /// Another service holds the home (perhaps one starting a moment ago): use it.
    Running {
        /// Its process id, as its lock file says (0 when unreadable).
        pid: u32,
    },
    /// It could not start; the same failure a command would have had.
    Failed {
        /// The exit code.
        code: u8,
        /// Why, for people.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_forms_are_the_documented_ones() {
        let run = Request::Run {
            args: vec!["send".into(), "@bob".into(), "hi".into()],
            cwd: "/home/alice".into(),
            tty: false,
        };
        assert_eq!(
            serde_json::to_string(&run).unwrap(),
            r#"{"run":{"args":["send","@bob","hi"],"cwd":"/home/alice","tty":false}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status {}).unwrap(),
            r#"{"status":{}}"#
        );
        assert_eq!(
            serde_json::to_string(&ClientFrame::Input(None)).unwrap(),
            r#"{"input":null}"#
        );
        assert_eq!(
            serde_json::to_string(&ClientFrame::Cancel { signal: None }).unwrap(),
            r#"{"cancel":{}}"#
        );
        assert_eq!(
            serde_json::to_string(&Frame::Out("x\n".into())).unwrap(),
            r#"{"out":"x\n"}"#
        );
        assert_eq!(
            serde_json::to_string(&Frame::Exit {
                code: 3,
                message: Some("no".into())
            })
            .unwrap(),
            r#"{"exit":{"code":3,"message":"no"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Announce::Ready { pid: 7 }).unwrap(),
            r#"{"ready":{"pid":7}}"#
        );
    }

    #[test]
    fn unknown_members_and_requests_are_refused() {
        for bad in [
            r#"{"run":{"args":[],"cwd":"/","tty":false,"env":{}}}"#,
            r#"{"exec":{}}"#,
            r#"{"status":{},"stop":{}}"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
