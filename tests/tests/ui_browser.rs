//! `kez-chat ui` in a real browser (issue 23): a real stack (nats-server with the auth callout,
//! the `kez-chat-server` binary), two empty homes with a `kez-chat ui` gateway each, and a
//! scenario of `tests/browser/` driving Debian's chromium through playwright-core.
//!
//! None of these tests skips: without chromium or `tests/browser/node_modules` it fails and
//! names the command that installs what is missing (`make browser-tools` checks both; `make
//! test` runs it first). Screenshots land in `target/ui-screenshots/<scenario>/`.

use kez_tests::browser::{self, UiStack};

/// Runs scenario `name` against a fresh stack and stops everything cleanly.
async fn scenario(name: &str) {
    // What is missing is said before anything starts.
    browser::scenario_script(name);
    browser::chromium_binary();
    browser::check_node_modules();
    let stack = UiStack::start().await;
    let run = stack.assert_scenario(name).await;
    println!(
        "scenario {name} passed in {:.1?}; screenshots in {}\n{}",
        run.elapsed,
        run.screenshots.display(),
        run.stdout.trim_end()
    );
    stack.stop().await;
}

#[tokio::test]
async fn smoke() {
    scenario("smoke").await;
}

#[tokio::test]
async fn two_users() {
    scenario("two_users").await;
}

#[tokio::test]
async fn devices() {
    scenario("devices").await;
}
