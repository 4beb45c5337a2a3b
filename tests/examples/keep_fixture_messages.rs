//! Lifts the 30-day `max_age` of the previous release's `KEZ_INBOX` stream in a `dev` data
//! directory, so that the committed upgrade fixture's messages are still there whenever a test
//! loads it (nats-server expires them when it opens the store). Run by
//! `tests/fixtures/make-v0.1-store.sh` after 0.1's stack stopped; checks the state the script
//! made (three waiting messages, three consumers) and changes nothing else.
//!
//! Usage: `cargo run -p kez-tests --example keep_fixture_messages -- <dev data dir>`

use std::path::PathBuf;
use std::time::Duration;

use kez_tests::previous_release::DevBroker;

#[tokio::main]
async fn main() {
    let data_dir: PathBuf = std::env::args_os()
        .nth(1)
        .expect("usage: keep_fixture_messages <dev data dir>")
        .into();
    let broker = DevBroker::start(&data_dir).await;
    let js = async_nats::jetstream::new(broker.server_client().await);
    let mut inbox = js.get_stream("KEZ_INBOX").await.expect("KEZ_INBOX exists");
    let info = inbox.info().await.expect("KEZ_INBOX answers").clone();
    assert_eq!(info.state.messages, 3, "m2, m3 and m4 wait: {info:?}");
    assert_eq!(
        info.state.consumer_count, 3,
        "one consumer per user: {info:?}"
    );
    let mut config = info.config.clone();
    config.max_age = Duration::ZERO;
    js.update_stream(&config).await.expect("max_age lifted");
    broker.stop().await;
    // What `dev::prepare` wrote for this start, not part of the fixture.
    for file in ["nats-server.conf", "port", "nats-server.log"] {
        let _ = std::fs::remove_file(data_dir.join(file));
    }
    eprintln!(
        "KEZ_INBOX keeps its {} messages forever",
        info.state.messages
    );
}
