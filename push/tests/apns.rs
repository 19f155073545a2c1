//! The APNs client and sender against the APNs test server: real sockets,
//! real TLS, HTTP/2, JWTs verified by the server.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use palaver_push::apns::{ApnsClient, ApnsRequest, ProviderClaims};
use palaver_push::sender::{Route, SubmitError};
use palaver_push::testing::{ApnsReply, TestKeyPair};
use palaver_push::{ApnsEnvironment, Attempt, Content, SendResult, SenderConfig};

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_push_reaches_apns_with_the_documented_headers_and_a_jwt_that_verifies() {
    init_tracing();
    let apns = Apns::start(|_| {}).await;
    let sender = apns.sender(apns.client(), fast_retries());
    let token = apns_token(1);
    let result = sender.submit(apns_note(&token)).unwrap().result().await;
    let SendResult::Delivered {
        id: Some(id),
        attempts: 1,
    } = result
    else {
        panic!("{result:?}")
    };

    let got = apns.server.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(
        (r.device_token.as_str(), r.status),
        (token.as_str(), Some(200))
    );
    assert_eq!(r.header("apns-topic"), Some(TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some("conv-1"));
    assert_eq!(
        r.header("apns-id"),
        Some(id.as_str()),
        "the answer's apns-id is the request's"
    );
    let expiration: u64 = r.header("apns-expiration").unwrap().parse().unwrap();
    assert!(
        expiration.abs_diff(now_s() + 600) <= 5,
        "expiration = now + ttl"
    );
    assert_eq!(r.payload["aps"]["badge"], 4);
    assert_eq!(r.payload["aps"]["alert"]["loc-key"], "PALAVER_NEW_MESSAGE");
    assert_eq!(r.payload["palaver"]["conversation"], "conv-1");
    assert_eq!(r.payload["palaver"]["seq"], 7);
    assert!(
        r.payload["aps"]["alert"].get("body").is_none(),
        "id-only carries no body"
    );

    // The server verified the JWT; check it independently too.
    let (iss, iat) = r.claims.clone().unwrap();
    assert_eq!(iss, TEAM);
    assert!(iat.abs_diff(now_s()) <= 5);
    let jwt = r.jwt.as_deref().unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (Algorithm::ES256, Some(KEY_ID))
    );
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims = HashSet::new();
    v.validate_exp = false;
    let key = DecodingKey::from_ec_pem(apns.key.public_pem.as_bytes()).unwrap();
    let claims = jsonwebtoken::decode::<ProviderClaims>(jwt, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims.iss, TEAM);
    assert_eq!(
        sender
            .stats(Route::Apns(ApnsEnvironment::Production))
            .delivered,
        1
    );
}

#[tokio::test]
async fn many_pushes_share_one_connection_within_the_servers_stream_limit() {
    let apns = Apns::start(|c| c.max_concurrent_streams = 8).await;
    let client = apns.client();
    let sender = apns.sender(client.clone(), fast_retries());
    let tickets: Vec<_> = (0..300)
        .map(|i| sender.submit(apns_note(&apns_token(i))).unwrap())
        .collect();
    for t in tickets {
        assert!(matches!(
            t.result().await,
            SendResult::Delivered { attempts: 1, .. }
        ));
    }
    assert_eq!(apns.server.delivered(), 300);
    assert_eq!(apns.server.connections(), 1, "one long-lived connection");
    assert_eq!(client.stats().connects, 1);
    // Streams beyond the server's limit would have been refused and retried.
    assert_eq!(
        sender
            .stats(Route::Apns(ApnsEnvironment::Production))
            .retries,
        0
    );
    assert_eq!(
        apns.server.distinct_tokens(),
        1,
        "one provider token for all"
    );
}

#[tokio::test]
async fn the_provider_token_is_reused_then_renewed_after_the_interval_and_never_sooner() {
    let apns = Apns::start(|c| c.min_token_renewal = Duration::from_secs(1)).await;
    let mut config = apns.config();
    // Wide enough that five sends fit in one interval on a loaded machine.
    config.token_refresh = Duration::from_secs(3);
    config.min_token_refresh = Duration::from_secs(3);
    let client = ApnsClient::new(config).unwrap();
    let sender = apns.sender(client.clone(), fast_retries());
    for i in 0..5 {
        assert!(matches!(
            sender
                .submit(apns_note(&apns_token(i)))
                .unwrap()
                .result()
                .await,
            SendResult::Delivered { .. }
        ));
    }
    assert_eq!(
        (client.stats().tokens_signed, apns.server.distinct_tokens()),
        (1, 1),
        "reused"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for i in 0..5 {
        assert!(matches!(
            sender
                .submit(apns_note(&apns_token(i)))
                .unwrap()
                .result()
                .await,
            SendResult::Delivered { .. }
        ));
    }
    assert_eq!(
        (client.stats().tokens_signed, apns.server.distinct_tokens()),
        (2, 2),
        "renewed once"
    );
    assert_eq!(
        (
            apns.server.tokens_accepted(),
            apns.server.renewals_refused()
        ),
        (2, 0)
    );
    let iats: Vec<u64> = apns
        .server
        .received()
        .iter()
        .map(|r| r.claims.clone().unwrap().1)
        .collect();
    assert!(iats[..5].iter().all(|i| *i == iats[0]) && iats[5..].iter().all(|i| *i > iats[0]));

    // The client refuses an interval Apple would punish.
    let mut fast = apns.config();
    fast.token_refresh = Duration::from_secs(5 * 60);
    let e = ApnsClient::new(fast).err().unwrap().to_string();
    assert!(e.contains("TooManyProviderTokenUpdates"), "{e}");
}

#[tokio::test]
async fn the_server_refuses_a_renewal_on_a_connection_sooner_than_its_minimum() {
    // Proves the test server's rule is real: a client that renews its token
    // a few seconds later, on the same connection, gets 429
    // TooManyProviderTokenUpdates; a second client with the same key (its
    // own connection and token: another provider server) is not refused.
    let apns = Apns::start(|c| c.min_token_renewal = Duration::from_secs(60)).await;
    let mut config = apns.config();
    config.token_refresh = Duration::from_secs(2);
    config.min_token_refresh = Duration::from_secs(2);
    let first = ApnsClient::new(config).unwrap();
    let request = |n| ApnsRequest {
        device_token: apns_token(n),
        topic: TOPIC.into(),
        push_type: "alert",
        priority: 10,
        expiration: 0,
        collapse_id: None,
        apns_id: "6f1e0f3c-0d3a-4b5e-9a7c-2b1d3e4f5a6b".into(),
        payload: br#"{"aps":{"alert":"hi"}}"#.to_vec().into(),
    };
    assert!(matches!(
        first.send(&request(1)).await,
        Attempt::Delivered { .. }
    ));
    let second = apns.client(); // signs its own token, on its own connection
    assert!(
        matches!(second.send(&request(2)).await, Attempt::Delivered { .. }),
        "another provider server's token is not a renewal"
    );
    assert_eq!(apns.server.connections(), 2);
    // Past the first client's refresh interval: it signs a new token, on
    // the connection it already has.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let attempt = first.send(&request(3)).await;
    assert!(
        matches!(&attempt, Attempt::Retry { reason, .. } if reason == "TooManyProviderTokenUpdates"),
        "{attempt:?}"
    );
    assert_eq!(apns.server.renewals_refused(), 1);
    assert!(
        matches!(second.send(&request(4)).await, Attempt::Delivered { .. }),
        "the other connection's token in force still works"
    );
}

#[tokio::test]
async fn unregistered_yields_token_invalid_with_the_servers_timestamp() {
    let apns = Apns::start(|_| {}).await;
    let sender = apns.sender(apns.client(), fast_retries());
    let (dead, bad) = (apns_token(1), apns_token(2));
    apns.server
        .script(&dead, [ApnsReply::unregistered(1_700_000_000_123)]);
    apns.server.script(&bad, [ApnsReply::bad_device_token()]);
    let r = sender.submit(apns_note(&dead)).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::TokenInvalid { since_ms: 1_700_000_000_123, reason } if reason == "Unregistered"),
        "{r:?}"
    );
    let r = sender.submit(apns_note(&bad)).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::TokenInvalid { reason, .. } if reason == "BadDeviceToken"),
        "{r:?}"
    );
    assert_eq!(apns.server.requests(), 2, "not retried");
    assert_eq!(
        sender
            .stats(Route::Apns(ApnsEnvironment::Production))
            .token_invalid,
        2
    );
}

#[tokio::test]
async fn too_many_requests_and_unavailable_are_retried_after_retry_after_then_delivered_once() {
    let apns = Apns::start(|_| {}).await;
    let sender = apns.sender(apns.client(), fast_retries());
    let token = apns_token(1);
    apns.server.script(
        &token,
        [
            ApnsReply::too_many_requests(Some(1)),
            ApnsReply::unavailable(Some(1)),
            ApnsReply::internal_error(),
        ],
    );
    let r = sender.submit(apns_note(&token)).unwrap().result().await;
    assert!(
        matches!(r, SendResult::Delivered { attempts: 4, .. }),
        "{r:?}"
    );
    assert_eq!(apns.server.delivered_to(&token), 1);
    let got = apns.server.received();
    let statuses: Vec<_> = got.iter().map(|r| r.status.unwrap()).collect();
    assert_eq!(statuses, vec![429, 503, 500, 200]);
    // Retry-After: 1 was honoured both times (a lower bound, not a timing).
    assert!(got[1].at - got[0].at >= Duration::from_secs(1));
    assert!(got[2].at - got[1].at >= Duration::from_secs(1));
    let ids: HashSet<_> = got
        .iter()
        .map(|r| r.header("apns-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "the same apns-id on every attempt");
    assert_eq!(
        sender
            .stats(Route::Apns(ApnsEnvironment::Production))
            .retries,
        3
    );
}

#[tokio::test]
async fn retries_stop_at_the_deadline_with_a_transient_failure() {
    let apns = Apns::start(|_| {}).await;
    let config = SenderConfig {
        min_retry_window: Duration::from_millis(300),
        max_retry_window: Duration::from_millis(300),
        ..fast_retries()
    };
    let sender = apns.sender(apns.client(), config);
    let token = apns_token(1);
    apns.server.script(
        &token,
        std::iter::repeat_n(ApnsReply::unavailable(None), 1000),
    );
    let r = sender.submit(apns_note(&token)).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::Failed { permanent: false, reason } if reason.contains("ServiceUnavailable")),
        "{r:?}"
    );
    assert_eq!(apns.server.delivered_to(&token), 0);
}

#[tokio::test]
async fn a_dropped_connection_is_reconnected_and_the_push_delivered_once() {
    init_tracing();
    let apns = Apns::start(|_| {}).await;
    let client = apns.client();
    let sender = apns.sender(client.clone(), fast_retries());
    let token = apns_token(1);
    assert!(matches!(
        sender
            .submit(apns_note(&apns_token(9)))
            .unwrap()
            .result()
            .await,
        SendResult::Delivered { .. }
    ));
    apns.server.script(&token, [ApnsReply::DropConnection]);
    let r = sender.submit(apns_note(&token)).unwrap().result().await;
    assert!(
        matches!(r, SendResult::Delivered { attempts: 2, .. }),
        "{r:?}"
    );
    assert_eq!(apns.server.delivered_to(&token), 1);
    assert_eq!(apns.server.connections(), 2);
    let stats = client.stats();
    assert_eq!((stats.connects, stats.drops), (2, 1));
    let conns: Vec<u64> = apns
        .server
        .received()
        .iter()
        .map(|r| r.connection)
        .collect();
    assert_eq!(conns, vec![1, 1, 2]);
}

#[tokio::test]
async fn an_expired_provider_token_is_renewed_once_and_the_push_retried() {
    // The server's token age limit is 1 s here (Apple's is an hour).
    let apns = Apns::start(|c| {
        c.token_max_age = Duration::from_secs(1);
        c.min_token_renewal = Duration::from_secs(1);
    })
    .await;
    let mut config = apns.config();
    config.min_token_refresh = Duration::from_secs(1);
    let client = ApnsClient::new(config).unwrap();
    let sender = apns.sender(client.clone(), fast_retries());
    assert!(matches!(
        sender
            .submit(apns_note(&apns_token(1)))
            .unwrap()
            .result()
            .await,
        SendResult::Delivered { .. }
    ));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = sender
        .submit(apns_note(&apns_token(2)))
        .unwrap()
        .result()
        .await;
    assert!(
        matches!(r, SendResult::Delivered { attempts: 1, .. }),
        "{r:?}"
    );
    let got = apns.server.received();
    let answers: Vec<_> = got
        .iter()
        .map(|r| (r.status.unwrap(), r.reason.clone()))
        .collect();
    assert_eq!(
        answers,
        vec![
            (200, None),
            (403, Some("ExpiredProviderToken".into())),
            (200, None)
        ]
    );
    assert_eq!(client.stats().tokens_signed, 2);
    assert_eq!(apns.server.renewals_refused(), 0);
}

#[tokio::test]
async fn a_wrong_key_is_rejected_by_the_server_as_a_permanent_config_error() {
    let apns = Apns::start(|_| {}).await;
    let other = TestKeyPair::apns();
    let client = ApnsClient::new(
        apns.server
            .client_config(KEY_ID, &other.private_pem)
            .unwrap(),
    )
    .unwrap();
    let sender = apns.sender(client, fast_retries());
    let r = sender
        .submit(apns_note(&apns_token(1)))
        .unwrap()
        .result()
        .await;
    let SendResult::Failed {
        reason,
        permanent: true,
    } = r
    else {
        panic!("{r:?}")
    };
    assert!(
        reason.contains("InvalidProviderToken") && reason.contains(KEY_ID) && reason.contains(TEAM),
        "{reason}"
    );
    assert_eq!(apns.server.delivered(), 0);
    // A wrong key id is refused the same way.
    let client = ApnsClient::new(
        apns.server
            .client_config("OTHERKEYID", &apns.key.private_pem)
            .unwrap(),
    )
    .unwrap();
    let sender = apns.sender(client, fast_retries());
    assert!(matches!(
        sender
            .submit(apns_note(&apns_token(1)))
            .unwrap()
            .result()
            .await,
        SendResult::Failed {
            permanent: true,
            ..
        }
    ));
}

#[tokio::test]
async fn the_server_checks_headers_and_payload_limits() {
    let apns = Apns::start(|_| {}).await;
    let client = apns.client();
    let base = ApnsRequest {
        device_token: apns_token(1),
        topic: TOPIC.into(),
        push_type: "alert",
        priority: 10,
        expiration: 0,
        collapse_id: None,
        apns_id: "6f1e0f3c-0d3a-4b5e-9a7c-2b1d3e4f5a6b".into(),
        payload: br#"{"aps":{}}"#.to_vec().into(),
    };
    let cases: Vec<(ApnsRequest, &str)> = vec![
        (
            ApnsRequest {
                topic: "com.other.app".into(),
                ..base.clone()
            },
            "400 TopicDisallowed",
        ),
        (
            ApnsRequest {
                push_type: "background",
                priority: 10,
                ..base.clone()
            },
            "400 BadPriority",
        ),
        (
            ApnsRequest {
                apns_id: "not-a-uuid".into(),
                ..base.clone()
            },
            "400 BadMessageId",
        ),
        (
            ApnsRequest {
                payload: vec![b' '; 4097].into(),
                ..base.clone()
            },
            "413 PayloadTooLarge",
        ),
        (
            ApnsRequest {
                payload: Vec::new().into(),
                ..base.clone()
            },
            "400 PayloadEmpty",
        ),
        (
            ApnsRequest {
                push_type: "bogus",
                ..base.clone()
            },
            "400 InvalidPushType",
        ),
    ];
    for (request, expected) in cases {
        let attempt = client.send(&request).await;
        assert_eq!(
            attempt,
            Attempt::Failed {
                reason: expected.into()
            }
        );
    }
    // A collapse id over 64 bytes never leaves the client.
    let long = ApnsRequest {
        collapse_id: Some("x".repeat(65)),
        ..base.clone()
    };
    assert!(
        matches!(client.send(&long).await, Attempt::Failed { reason } if reason.contains("apns-collapse-id"))
    );
    // A non-hex token is a dead token.
    let bad = ApnsRequest {
        device_token: "zz".into(),
        ..base
    };
    assert!(matches!(
        client.send(&bad).await,
        Attempt::TokenInvalid { .. }
    ));
}

#[tokio::test]
async fn a_full_queue_is_reported_and_counted_never_dropped_silently() {
    // A server that accepts TCP and never answers TLS: the one push in
    // flight is stuck connecting, so the queue fills.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let apns = Apns::start(|_| {}).await;
    let mut config = apns.config();
    config.endpoint = format!("https://{addr}");
    let client = ApnsClient::new(config).unwrap();
    let sender = apns.sender(
        client,
        SenderConfig {
            queue_capacity: 2,
            max_in_flight: 1,
            ..fast_retries()
        },
    );
    let results: Vec<_> = (0..6)
        .map(|i| sender.submit(apns_note(&apns_token(i))))
        .collect();
    // At most one in flight and two queued: the first two always fit, the
    // fourth on never does.
    assert!(results[..2].iter().all(Result::is_ok));
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(SubmitError::QueueFull(q)) if q.capacity == 2))
        .count();
    assert!(full >= 3, "{full}");
    let stats = sender.stats(Route::Apns(ApnsEnvironment::Production));
    assert_eq!(stats.queue_full, full as u64);
    assert_eq!(stats.submitted as usize + full, 6);
    let e = results
        .into_iter()
        .find_map(Result::err)
        .unwrap()
        .to_string();
    assert_eq!(e, "apns push queue full (2 waiting)");
}

#[tokio::test]
async fn notifications_that_cannot_be_sent_say_why_at_once() {
    let apns = Apns::start(|_| {}).await;
    let sender = apns.sender(apns.client(), fast_retries());
    let mut no_topic = apns_note(&apns_token(1));
    no_topic.apns_topic = None;
    let r = sender.submit(no_topic).unwrap().result().await;
    assert!(
        matches!(&r, SendResult::Failed { permanent: true, reason } if reason.contains("apns_topic")),
        "{r:?}"
    );
    let sandbox = palaver_push::Notification {
        apns_environment: ApnsEnvironment::Sandbox,
        ..apns_note(&apns_token(1))
    };
    assert_eq!(
        sender.submit(sandbox).err(),
        Some(SubmitError::NoProvider(Route::Apns(
            ApnsEnvironment::Sandbox
        )))
    );
    assert_eq!(
        sender.submit(fcm_note("t")).err().unwrap().to_string(),
        "no fcm credentials configured"
    );
    // A background push goes out as Apple wants it.
    let bg = palaver_push::Notification {
        content: Content::Background,
        ..apns_note(&apns_token(2))
    };
    assert!(matches!(
        sender.submit(bg).unwrap().result().await,
        SendResult::Delivered { .. }
    ));
    let r = apns.server.received().pop().unwrap();
    assert_eq!(
        (r.header("apns-push-type"), r.header("apns-priority")),
        (Some("background"), Some("5"))
    );
    assert_eq!(apns.server.requests(), 1);
}

#[tokio::test]
async fn a_silent_connection_times_out_and_is_replaced() {
    let apns = Apns::start(|_| {}).await;
    let mut config = apns.config();
    config.conn.request_timeout = Duration::from_millis(500);
    let client = ApnsClient::new(config).unwrap();
    let sender = apns.sender(client.clone(), fast_retries());
    let token = apns_token(1);
    apns.server.script(&token, [ApnsReply::Stall]);
    let r = sender.submit(apns_note(&token)).unwrap().result().await;
    assert!(
        matches!(r, SendResult::Delivered { attempts: 2, .. }),
        "{r:?}"
    );
    assert_eq!(apns.server.delivered_to(&token), 1);
    assert_eq!(
        apns.server.connections(),
        2,
        "the silent connection was closed and replaced"
    );
    assert_eq!(client.stats().connects, 2);
}

#[tokio::test]
async fn a_provider_outage_is_retried_with_backoff_and_each_push_delivered_once_after() {
    init_tracing();
    let apns = Apns::start(|_| {}).await;
    let client = apns.client();
    let sender = apns.sender(
        client.clone(),
        SenderConfig {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
            ..SenderConfig::default()
        },
    );
    assert!(matches!(
        sender
            .submit(apns_note(&apns_token(0)))
            .unwrap()
            .result()
            .await,
        SendResult::Delivered { .. }
    ));
    apns.server.set_down(true);
    let tickets: Vec<_> = (1..=20)
        .map(|i| sender.submit(apns_note(&apns_token(i))).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    apns.server.set_down(false);
    for t in tickets {
        let r = t.result().await;
        assert!(matches!(r, SendResult::Delivered { .. }), "{r:?}");
    }
    for i in 0..=20 {
        assert_eq!(
            apns.server.delivered_to(&apns_token(i)),
            1,
            "token {i}: exactly once"
        );
    }
    let stats = client.stats();
    assert!(apns.server.refused() >= 1 && stats.connect_failures >= 1);
    // One connect at a time, paced by backoff: not one per push per retry.
    assert!(stats.connect_failures <= 15, "{stats:?}");
    assert_eq!(
        apns.server.connections(),
        2,
        "the first connection, then one after the outage"
    );
}

#[test]
fn a_missing_or_bad_key_file_says_which_path_and_what_to_give() {
    use palaver_push::apns::{ApnsConfig, APNS_PRODUCTION};
    let missing = std::path::Path::new("/nonexistent/AuthKey_KEY1234567.p8");
    let e = ApnsConfig::from_key_file(APNS_PRODUCTION, TEAM, KEY_ID, missing)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/AuthKey_KEY1234567.p8") && e.contains("Apple developer account"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("palaver-push-p8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("AuthKey_KEY1234567.p8");
    // An RSA key is not an APNs key.
    std::fs::write(&path, TestKeyPair::rsa().private_pem).unwrap();
    let e = ApnsConfig::from_key_file(APNS_PRODUCTION, TEAM, KEY_ID, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&path.display().to_string())
            && e.contains("P-256")
            && e.contains("AuthKey_KEY1234567.p8"),
        "{e}"
    );
    std::fs::write(&path, TestKeyPair::apns().private_pem).unwrap();
    assert!(ApnsConfig::from_key_file(APNS_PRODUCTION, TEAM, KEY_ID, &path).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}
