//! The SDK and push notifications end to end: an app registers its APNs
//! token and its sleeping phone gets pushes from the embedded gateway's
//! in-process push worker at the APNs test server.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use palaver_client::ClientEvent;

/// A phone asleep: the app registered its APNs token through the SDK and
/// closed; messages to it come out at the APNs test server (Apple's
/// documented HTTP/2 contract, JWT checked) as one push per burst, from the
/// embedded engine's in-process push worker.
#[test]
fn an_app_registers_its_apns_token_through_the_sdk_and_gets_one_push_per_burst_while_asleep() {
    use palaver_push::testing::{ApnsServerConfig, ApnsTestServer, TestKeyPair};
    const TEAM: &str = "TEAM123456";
    const KEY_ID: &str = "KEY1234567";
    const TOPIC: &str = "com.example.palaver";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = TestKeyPair::apns();
    let mut server = ApnsServerConfig::new(TEAM, KEY_ID, &key.public_pem);
    server.topics = vec![TOPIC.into()];
    let apns = runtime.block_on(ApnsTestServer::start(server)).unwrap();
    let files = std::env::temp_dir().join(format!("palaver-sdk-push-{}", std::process::id()));
    std::fs::create_dir_all(&files).unwrap();
    let providers = apns.write_providers(&files, &key).unwrap();
    let stack = Stack::start(|c| {
        c.push.providers = Some(providers.clone());
        c.presence_visibility = palaver_router::PresenceVisibility::Everyone;
    });
    let (alice, ra) = stack.login("alice", "phone");
    alice
        .subscribe_presence(vec!["bob".into(), "carol".into()])
        .unwrap();
    // bob's and carol's apps register their phones' tokens, then close.
    let hex = |t: &[u8]| t.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut tokens = Vec::new();
    for (user, byte) in [("bob", 0xb0u8), ("carol", 0xca)] {
        let (app, r) = stack.login(user, "phone");
        let token = vec![byte; 32];
        let ticket = app
            .register_apns_token(token.clone(), false, TOPIC.into(), None)
            .unwrap();
        r.wait("the registration", T, |e| {
            e.iter().any(
                |e| matches!(e, ClientEvent::PushTokenRegistered { ticket: t, .. } if *t == ticket),
            )
        });
        app.shutdown();
        ra.wait(&format!("{user} offline"), T, |e| {
            e.iter().any(|e| {
                matches!(e, ClientEvent::PresenceChanged { presence }
                    if presence.user_id == user && !presence.online)
            })
        });
        tokens.push(hex(&token));
    }
    // A burst of five to bob, then one to carol: pushes leave in the order
    // the messages were stored, so carol's push arriving means every push
    // for bob's burst was handled.
    let bob_dm = dm("alice", "bob");
    send_numbered(&alice, &bob_dm, "burst", 5);
    ra.wait_acked(5);
    alice
        .send_text(dm("alice", "carol"), "fence".into())
        .unwrap();
    let deadline = Instant::now() + T;
    while apns.delivered_to(&tokens[1]) == 0 {
        assert!(
            Instant::now() < deadline,
            "no push for carol: {:?}",
            apns.received()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let to_bob: Vec<_> = apns
        .received()
        .into_iter()
        .filter(|r| r.device_token == tokens[0])
        .collect();
    assert_eq!(to_bob.len(), 1, "one push per burst: {to_bob:?}");
    assert_eq!(to_bob[0].header("apns-topic"), Some(TOPIC));
    assert_eq!(
        to_bob[0].payload["aps"]["badge"], 1,
        "{}",
        to_bob[0].payload
    );
    alice.shutdown();
    let _ = std::fs::remove_dir_all(&files);
}
