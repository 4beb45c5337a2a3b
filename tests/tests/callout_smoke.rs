//! The callout lets a KEZ key connect: unregistered with the narrow profile, registered (after a
//! reconnect) with the chat profile.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kez_core::{Handle, SecretKey};
use kez_proto::registry::RegistrationRequest;
use kez_tests::callout::CalloutStack;
use kez_tests::kez_server::{TEST_DOMAIN, call};

#[tokio::test]
async fn register_over_the_narrow_profile_then_reconnect_with_the_full_one() {
    let stack = CalloutStack::start().await;
    let alice = Arc::new(SecretKey::generate());
    let (client, _errors) = stack
        .connect_as(&alice)
        .await
        .expect("unregistered key connects");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let request =
        RegistrationRequest::sign(&alice, &Handle::parse("alice", TEST_DOMAIN).unwrap(), now);
    call(
        &client,
        "kez.registry.register",
        serde_json::to_vec(&request).unwrap(),
    )
    .await
    .expect("registration over the narrow profile");
    let (client, _errors) = stack
        .connect_as(&alice)
        .await
        .expect("registered key connects");
    let head = call(
        &client,
        "kez.sigchain.head",
        serde_json::to_vec(&serde_json::json!({"key": alice.public_key()})).unwrap(),
    )
    .await;
    assert_eq!(
        head.unwrap_err().code,
        404,
        "the full profile reaches kez.sigchain.*"
    );
}
