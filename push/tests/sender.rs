//! The sender as the push worker will drive it: from a plain (non-async)
//! thread, with the runtime beside it, both providers at once, fed by the
//! coalescer.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use palaver_push::apns::ApnsClient;
use palaver_push::coalesce::{Coalescer, Sequenced};
use palaver_push::fcm::FcmClient;
use palaver_push::sender::Route;
use palaver_push::testing::{
    ApnsReply, ApnsServerConfig, ApnsTestServer, FcmReply, FcmServerConfig, FcmTestServer,
    TestKeyPair,
};
use palaver_push::{ApnsEnvironment, Notification, SendResult, Sender};

/// A push event as the worker would have it after its checks.
#[derive(Clone, Debug)]
struct Event {
    seq: u64,
    unread: u32,
}

impl Sequenced for Event {
    fn seq(&self) -> u64 {
        self.seq
    }
}

#[test]
fn a_synchronous_caller_submits_and_waits_on_both_providers() {
    // The worker's handler runs on the consumer loop's thread; the sender's
    // tasks run on a runtime of their own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let apns_key = TestKeyPair::apns();
    let fcm_key = TestKeyPair::rsa();
    let (apns, fcm) = rt.block_on(async {
        let mut c = ApnsServerConfig::new(TEAM, KEY_ID, &apns_key.public_pem);
        c.topics = vec![TOPIC.into()];
        let apns = ApnsTestServer::start(c).await.unwrap();
        let fcm = FcmTestServer::start(FcmServerConfig::new(
            "proj",
            "sa@proj.iam.gserviceaccount.com",
            &fcm_key.public_pem,
        ))
        .await
        .unwrap();
        (apns, fcm)
    });
    let apns_client =
        ApnsClient::new(apns.client_config(KEY_ID, &apns_key.private_pem).unwrap()).unwrap();
    let fcm_client = FcmClient::new(fcm.client_config(&fcm_key.private_pem).unwrap()).unwrap();
    let sender = Sender::builder(fast_retries())
        .apns(ApnsEnvironment::Production, apns_client)
        .fcm(fcm_client)
        .start(rt.handle());
    assert!(sender.serves(Route::Fcm) && !sender.serves(Route::Apns(ApnsEnvironment::Sandbox)));

    apns.script(&apns_token(2), [ApnsReply::unregistered(1_700_000_000_000)]);
    fcm.script("fcm-dead", [FcmReply::unregistered()]);
    let batch = vec![
        apns_note(&apns_token(1)),
        apns_note(&apns_token(2)),
        fcm_note("fcm-live"),
        fcm_note("fcm-dead"),
    ];
    // Submit the whole batch, then wait: the sends overlap.
    let tickets: Vec<_> = batch
        .into_iter()
        .map(|n| sender.submit(n).unwrap())
        .collect();
    let results: Vec<SendResult> = tickets.into_iter().map(|t| t.wait()).collect();
    assert!(matches!(results[0], SendResult::Delivered { .. }));
    assert!(matches!(
        results[1],
        SendResult::TokenInvalid {
            since_ms: 1_700_000_000_000,
            ..
        }
    ));
    assert!(matches!(results[2], SendResult::Delivered { .. }));
    assert!(matches!(results[3], SendResult::TokenInvalid { .. }));
    assert_eq!((apns.delivered(), fcm.delivered()), (1, 1));
    drop(sender);
    rt.block_on(async { drop((apns, fcm)) });
}

#[tokio::test]
async fn a_burst_through_the_coalescer_is_one_push_with_the_latest_seq_and_badge() {
    let apns = Apns::start(|_| {}).await;
    let sender = apns.sender(apns.client(), fast_retries());
    let token = apns_token(1);
    // 25 messages to bob in conv-1 and 3 in conv-2 within the window; the
    // clock is driven by hand.
    let t0 = Instant::now();
    let mut coalescer: Coalescer<(&str, &str), Event> =
        Coalescer::new(Duration::from_millis(1500), 10_000);
    for i in 1..=25u64 {
        coalescer.offer(
            t0 + Duration::from_millis(i * 20),
            ("bob", "conv-1"),
            Event {
                seq: 100 + i,
                unread: i as u32 + 2,
            },
        );
    }
    for i in 1..=3u64 {
        coalescer.offer(
            t0 + Duration::from_millis(i * 30),
            ("bob", "conv-2"),
            Event { seq: i, unread: 30 },
        );
    }
    assert!(coalescer
        .pop_due(t0 + Duration::from_millis(1000))
        .is_none());
    let mut tickets = Vec::new();
    while let Some(burst) = coalescer.pop_due(t0 + Duration::from_secs(2)) {
        let (_, conversation) = burst.key;
        let n = Notification {
            conversation_id: conversation.into(),
            collapse_id: Some(conversation.into()),
            seq: burst.latest.seq,
            badge: Some(burst.latest.unread),
            ..apns_note(&token)
        };
        tickets.push(sender.submit(n).unwrap());
    }
    for t in tickets {
        assert!(matches!(t.result().await, SendResult::Delivered { .. }));
    }
    let got = apns.server.received();
    assert_eq!(got.len(), 2, "one push per conversation burst");
    assert_eq!(
        (
            got[0].payload["palaver"]["seq"].as_u64(),
            got[0].payload["aps"]["badge"].as_u64()
        ),
        (Some(125), Some(27))
    );
    assert_eq!(got[0].header("apns-collapse-id"), Some("conv-1"));
    assert_eq!(got[1].payload["palaver"]["seq"], 3);
    assert_eq!(got[1].header("apns-collapse-id"), Some("conv-2"));
}

#[tokio::test]
async fn a_deployments_toml_builds_a_sender_for_its_providers() {
    let apns_key = TestKeyPair::apns();
    let rsa = TestKeyPair::rsa();
    let mut c = ApnsServerConfig::new(TEAM, KEY_ID, &apns_key.public_pem);
    c.topics = vec![TOPIC.into()];
    let apns = ApnsTestServer::start(c).await.unwrap();
    let fcm = FcmTestServer::start(FcmServerConfig::new(
        "proj",
        "sa@proj.iam.gserviceaccount.com",
        &rsa.public_pem,
    ))
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("palaver-push-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let key_file = write("AuthKey.p8", &apns_key.private_pem);
    let sa_file = write("sa.json", &fcm.service_account_json(&rsa.private_pem));
    let apns_ca = write("apns-ca.pem", apns.ca_pem());
    let fcm_ca = write("fcm-ca.pem", fcm.ca_pem());
    let toml_text = format!(
        r#"
        [apns]
        key_file = "{key_file}"
        key_id = "{KEY_ID}"
        team_id = "{TEAM}"
        environments = ["sandbox"]
        sandbox_url = "{}"
        ca_file = "{apns_ca}"

        [fcm]
        service_account_file = "{sa_file}"
        url = "{}"
        ca_file = "{fcm_ca}"
        "#,
        apns.url(),
        fcm.url()
    );
    let config: palaver_push::ProvidersConfig = toml::from_str(&toml_text).unwrap();
    let (sender, routes) = config
        .build(fast_retries(), &tokio::runtime::Handle::current())
        .unwrap();
    assert_eq!(
        routes,
        vec![Route::Apns(ApnsEnvironment::Sandbox), Route::Fcm]
    );
    let n = Notification {
        apns_environment: ApnsEnvironment::Sandbox,
        ..apns_note(&apns_token(1))
    };
    assert!(matches!(
        sender.submit(n).unwrap().result().await,
        SendResult::Delivered { .. }
    ));
    assert!(matches!(
        sender.submit(fcm_note("tok")).unwrap().result().await,
        SendResult::Delivered { .. }
    ));
    assert_eq!((apns.delivered(), fcm.delivered()), (1, 1));

    let empty: palaver_push::ProvidersConfig = toml::from_str("").unwrap();
    assert!(empty.is_empty());
    let bad: Result<palaver_push::ProvidersConfig, _> =
        toml::from_str("[apns]\nkey_file = \"x\"\nkey_id = \"k\"\nteam_id = \"t\"\nbogus = 1\n");
    assert!(bad.is_err(), "unknown keys are refused");
    std::fs::remove_dir_all(&dir).unwrap();
}
