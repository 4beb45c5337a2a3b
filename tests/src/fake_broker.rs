//! A fake NATS broker on loopback: it hands a client an `INFO` of the test's choosing and
//! records what the client answers. It stands in for a hostile broker, or for someone on the
//! path of a plain connection, in tests of what a client does with what a broker sends. It
//! never replaces nats-server in a test of kez services.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the fake does after it answered a client's `PING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPong {
    /// Keeps the connection open (answering further `PING`s).
    Stay,
    /// Closes it at once, so the client reconnects.
    Hang,
}

/// A fake broker listening on `127.0.0.1` until dropped.
pub struct FakeBroker {
    addr: SocketAddr,
    accepted: Arc<Mutex<usize>>,
    connects: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBroker {
    /// Starts a fake that sends `nonce` in its `INFO`, advertises `connect_urls`, answers the
    /// first `PING` with `PONG` and then does what `after` says.
    pub async fn start(nonce: &str, connect_urls: &[String], after: AfterPong) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let info = json!({
            "server_id": "NFAKEBROKER",
            "server_name": "fake",
            "version": "2.15.1",
            "proto": 1,
            "go": "go1.25",
            "host": "127.0.0.1",
            "port": addr.port(),
            "headers": true,
            "max_payload": 1_048_576,
            "nonce": nonce,
            "connect_urls": connect_urls,
        });
        let accepted = Arc::new(Mutex::new(0));
        let connects = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (accepted, connects) = (accepted.clone(), connects.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    *accepted.lock().unwrap() += 1;
                    let connects = connects.clone();
                    let info = info.clone();
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        if write
                            .write_all(format!("INFO {info}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                        let mut lines = BufReader::new(read).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if let Some(connect) = line.strip_prefix("CONNECT ") {
                                let connect = serde_json::from_str(connect)
                                    .unwrap_or_else(|_| Value::String(connect.to_owned()));
                                connects.lock().unwrap().push(connect);
                            } else if line == "PING"
                                && (write.write_all(b"PONG\r\n").await.is_err()
                                    || after == AfterPong::Hang)
                            {
                                return;
                            }
                        }
                    });
                }
            })
        };
        FakeBroker {
            addr,
            accepted,
            connects,
            task,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// How many connections it accepted.
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }

    /// The `CONNECT` objects clients sent, in order.
    pub fn connects(&self) -> Vec<Value> {
        self.connects.lock().unwrap().clone()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}
