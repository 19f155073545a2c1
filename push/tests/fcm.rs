//! The FCM client and sender against the FCM test server (OAuth token
//! endpoint + HTTP v1 send) over real TLS and HTTP/2.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use palaver_push::fcm::{FcmClient, FcmConfig, ServiceAccount};
use palaver_push::sender::Route;
use palaver_push::testing::{FcmReply, FcmServerConfig, FcmTestServer, TestKeyPair};
use palaver_push::{Content, Notification, SendResult, Sender, SenderConfig};

const PROJECT: &str = "palaver-test";
const EMAIL: &str = "push@palaver-test.iam.gserviceaccount.com";

struct Fcm {
    server: FcmTestServer,
    key: TestKeyPair,
}

impl Fcm {
    async fn start() -> Self {
        let key = TestKeyPair::rsa();
        let server = FcmTestServer::start(FcmServerConfig::new(PROJECT, EMAIL, &key.public_pem))
            .await
            .unwrap();
        Fcm { server, key }
    }

    fn client(&self) -> FcmClient {
        FcmClient::new(self.server.client_config(&self.key.private_pem).unwrap()).unwrap()
    }

    fn sender(&self, client: FcmClient, config: SenderConfig) -> Sender {
        Sender::builder(config)
            .fcm(client)
            .start(&tokio::runtime::Handle::current())
    }
}

fn token(n: u32) -> String {
    format!("fcm-token-{n}:APA91b{}", "x".repeat(140))
}

#[tokio::test]
async fn the_oauth_exchange_happens_once_and_is_cached_across_sends() {
    init_tracing();
    let fcm = Fcm::start().await;
    let client = fcm.client();
    let sender = fcm.sender(client.clone(), fast_retries());
    // Concurrent first sends wait for one exchange.
    let tickets: Vec<_> = (0..50)
        .map(|i| sender.submit(fcm_note(&token(i))).unwrap())
        .collect();
    for t in tickets {
        let r = t.result().await;
        assert!(
            matches!(&r, SendResult::Delivered { id: Some(id), attempts: 1 } if id.starts_with("projects/palaver-test/messages/")),
            "{r:?}"
        );
    }
    assert!(matches!(
        sender.submit(fcm_note(&token(99))).unwrap().result().await,
        SendResult::Delivered { .. }
    ));
    assert_eq!(fcm.server.token_exchanges(), 1);
    assert_eq!(client.stats().token_exchanges, 1);
    assert_eq!(fcm.server.delivered(), 51);
    assert_eq!(
        fcm.server.connections(),
        2,
        "one connection for sends, one for the token endpoint"
    );

    let m = &fcm.server.received()[0].message["message"];
    assert_eq!(m["data"]["conversation"], "conv-1");
    assert_eq!(m["data"]["seq"], "7");
    assert_eq!(m["data"]["badge"], "4");
    assert_eq!(m["android"]["ttl"], "600s");
    assert_eq!(m["android"]["priority"], "HIGH");
    assert_eq!(m["android"]["collapse_key"], "conv-1");
    assert!(m.get("notification").is_none(), "id-only is a data message");
}

#[tokio::test]
async fn a_preview_is_a_notification_with_tag_and_count() {
    let fcm = Fcm::start().await;
    let sender = fcm.sender(fcm.client(), fast_retries());
    let n = Notification {
        content: Content::Preview {
            title: Some("Ann".into()),
            body: "lunch?".into(),
        },
        ..fcm_note(&token(1))
    };
    assert!(matches!(
        sender.submit(n).unwrap().result().await,
        SendResult::Delivered { .. }
    ));
    let m = &fcm.server.received()[0].message["message"];
    assert_eq!(
        (
            m["notification"]["title"].as_str(),
            m["notification"]["body"].as_str()
        ),
        (Some("Ann"), Some("lunch?"))
    );
    assert_eq!(m["android"]["notification"]["tag"], "conv-1");
    assert_eq!(m["android"]["notification"]["notification_count"], 4);
}

#[tokio::test]
async fn unregistered_is_token_invalid_and_not_retried() {
    let fcm = Fcm::start().await;
    let sender = fcm.sender(fcm.client(), fast_retries());
    fcm.server.script(&token(1), [FcmReply::unregistered()]);
    let before = palaver_push_now_ms();
    let r = sender.submit(fcm_note(&token(1))).unwrap().result().await;
    let SendResult::TokenInvalid { since_ms, reason } = r else {
        panic!("{r:?}")
    };
    assert!(
        since_ms >= before && reason.contains("UNREGISTERED"),
        "{since_ms} {reason}"
    );
    assert_eq!(fcm.server.received().len(), 1);
    assert_eq!(sender.stats(Route::Fcm).token_invalid, 1);
}

fn palaver_push_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn quota_exceeded_and_unavailable_are_retried_after_retry_after_then_delivered_once() {
    let fcm = Fcm::start().await;
    let sender = fcm.sender(fcm.client(), fast_retries());
    fcm.server.script(
        &token(1),
        [
            FcmReply::quota_exceeded(Some(1)),
            FcmReply::unavailable(None),
            FcmReply::error("INTERNAL"),
            FcmReply::DropConnection,
        ],
    );
    let started = tokio::time::Instant::now();
    let r = sender.submit(fcm_note(&token(1))).unwrap().result().await;
    assert!(
        matches!(r, SendResult::Delivered { attempts: 5, .. }),
        "{r:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert_eq!(fcm.server.delivered_to(&token(1)), 1);
    let errors: Vec<_> = fcm
        .server
        .received()
        .iter()
        .map(|r| r.error.clone())
        .collect();
    assert_eq!(
        errors[..3],
        [
            Some("QUOTA_EXCEEDED".into()),
            Some("UNAVAILABLE".into()),
            Some("INTERNAL".into())
        ]
    );
    assert_eq!(fcm.server.token_exchanges(), 1);
}

#[tokio::test]
async fn invalid_argument_and_sender_id_mismatch_are_permanent() {
    let fcm = Fcm::start().await;
    let sender = fcm.sender(fcm.client(), fast_retries());
    fcm.server
        .script(&token(1), [FcmReply::error("INVALID_ARGUMENT")]);
    let r = sender.submit(fcm_note(&token(1))).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::Failed { permanent: true, reason } if reason.contains("INVALID_ARGUMENT")),
        "{r:?}"
    );
    // A 401 about the APNs credentials uploaded to Firebase is not ours to
    // fix by a new access token: permanent, no second exchange.
    fcm.server
        .script(&token(3), [FcmReply::error("THIRD_PARTY_AUTH_ERROR")]);
    let r = sender.submit(fcm_note(&token(3))).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::Failed { permanent: true, reason } if reason.contains("THIRD_PARTY_AUTH_ERROR")),
        "{r:?}"
    );
    assert_eq!(fcm.server.token_exchanges(), 1);

    let mut config = fcm.server.client_config(&fcm.key.private_pem).unwrap();
    config.project_id = Some("someone-elses-project".into());
    let sender = fcm.sender(FcmClient::new(config).unwrap(), fast_retries());
    let r = sender.submit(fcm_note(&token(2))).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::Failed { permanent: true, reason } if reason.contains("SENDER_ID_MISMATCH")),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_refused_at_the_token_endpoint() {
    let fcm = Fcm::start().await;
    let other = TestKeyPair::rsa_other();
    let client = FcmClient::new(fcm.server.client_config(&other.private_pem).unwrap()).unwrap();
    let sender = fcm.sender(client, fast_retries());
    let r = sender.submit(fcm_note(&token(1))).unwrap().result().await;
    let SendResult::Failed {
        reason,
        permanent: true,
    } = r
    else {
        panic!("{r:?}")
    };
    assert!(
        reason.contains("invalid_grant")
            && reason.contains("Invalid JWT Signature")
            && reason.contains(EMAIL),
        "{reason}"
    );
    assert_eq!(
        (
            fcm.server.exchanges_refused(),
            fcm.server.token_exchanges(),
            fcm.server.delivered()
        ),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn a_revoked_access_token_is_exchanged_again_once() {
    let fcm = Fcm::start().await;
    let client = fcm.client();
    let sender = fcm.sender(client.clone(), fast_retries());
    assert!(matches!(
        sender.submit(fcm_note(&token(1))).unwrap().result().await,
        SendResult::Delivered { .. }
    ));
    fcm.server.revoke_access_tokens();
    let r = sender.submit(fcm_note(&token(2))).unwrap().result().await;
    assert!(
        matches!(r, SendResult::Delivered { attempts: 1, .. }),
        "{r:?}"
    );
    assert_eq!(fcm.server.token_exchanges(), 2);
    let statuses: Vec<_> = fcm.server.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Some(200), Some(401), Some(200)]);
}

#[tokio::test]
async fn an_access_token_near_expiry_is_replaced_before_it_expires() {
    let key = TestKeyPair::rsa();
    let mut server_config = FcmServerConfig::new(PROJECT, EMAIL, &key.public_pem);
    server_config.token_lifetime = Duration::from_secs(5);
    let server = FcmTestServer::start(server_config).await.unwrap();
    let mut config = server.client_config(&key.private_pem).unwrap();
    // Replaced 2 s after the exchange, 3 s before it would expire.
    config.refresh_margin = Duration::from_secs(3);
    let sender = Sender::builder(fast_retries())
        .fcm(FcmClient::new(config).unwrap())
        .start(&tokio::runtime::Handle::current());
    for i in 0..3 {
        assert!(matches!(
            sender.submit(fcm_note(&token(i))).unwrap().result().await,
            SendResult::Delivered { .. }
        ));
    }
    assert_eq!(server.token_exchanges(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        sender.submit(fcm_note(&token(9))).unwrap().result().await,
        SendResult::Delivered { attempts: 1, .. }
    ));
    assert_eq!(
        server.token_exchanges(),
        2,
        "renewed within the margin, no 401 first"
    );
    assert!(server.received().iter().all(|r| r.status == Some(200)));
}

#[test]
fn bad_service_account_files_say_which_path_and_what_to_fix() {
    let dir = std::env::temp_dir().join(format!("palaver-push-sa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sa.json");
    std::fs::write(&path, r#"{"type":"service_account","client_email":"a@b","private_key":"nope","token_uri":"https://oauth2.googleapis.com/token","project_id":"p"}"#).unwrap();
    let account = ServiceAccount::from_file(&path).unwrap();
    let e = FcmClient::new(FcmConfig::new(palaver_push::fcm::FCM_ENDPOINT, account))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("a@b") && e.contains("RSA private key"), "{e}");
    std::fs::write(&path, "{").unwrap();
    let e = ServiceAccount::from_file(&path).unwrap_err().to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("Firebase console"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
