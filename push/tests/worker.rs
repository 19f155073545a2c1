//! The push worker end to end on real parts: Kafka and Redis from the test
//! kit, a router worker fed Inbound records (RegisterPushToken,
//! MuteConversation, Send), the push worker on its consumer loop, and the
//! APNs test server over HTTP/2 and TLS. Bob is never connected (no session
//! opens), so each message to him is a push event for his APNs token.
// A test: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use palaver_protocol::pb::{self, frame::Body};
use palaver_push::apns::ApnsClient;
use palaver_push::fcm::FcmClient;
use palaver_push::testing::{
    ApnsReceived, ApnsReply, ApnsServerConfig, ApnsTestServer, TestKeyPair,
};
use palaver_push::testing::{FcmReply, FcmServerConfig, FcmTestServer};
use palaver_push::worker::{ContentPolicy, PushWorker, PushWorkerConfig, PushWorkerStats};
use palaver_push::{ApnsEnvironment, Sender, SenderConfig};
use palaver_router::api::{Inbound, Session, SessionAddr};
use palaver_router::kafka::worker::{RouterWorker, WorkerConfig};
use palaver_router::kafka::{self, INBOUND_TOPIC};
use palaver_router::redis_store::{RedisConfig, RedisStore};
use palaver_router::store::{ConversationStore, PushStore};
use palaver_testkit::stack::{Kafka, Redis};
use prost::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const TOPIC: &str = "com.example.palaver";
const BOB_TOKEN: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
const LIMIT: Duration = Duration::from_secs(60);

fn dm(a: &str, b: &str) -> String {
    palaver_protocol::direct_conversation_id(a, b)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits for `what` to hold, checking every 20 ms, at most [`LIMIT`].
fn await_until(what: &str, mut ready: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ready() {
        assert!(began.elapsed() < LIMIT, "waited {LIMIT:?} for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

struct Rig {
    brokers: String,
    producer: BaseProducer,
    redis: Redis,
    request_id: u32,
    _kafka: Kafka,
}

impl Rig {
    fn start() -> Self {
        let kafka = Kafka::start().expect("kafka");
        let brokers = kafka.bootstrap();
        kafka::ensure_topics(
            &brokers,
            &[(&kafka::delivery_topic("gwx"), 1)],
            Duration::from_secs(10),
        )
        .unwrap();
        Rig {
            producer: kafka::producer_config(&brokers, 0).create().unwrap(),
            redis: Redis::start().expect("redis-server"),
            brokers,
            request_id: 0,
            _kafka: kafka,
        }
    }

    fn redis_config(&self) -> RedisConfig {
        RedisConfig::standalone(self.redis.url())
    }

    fn store(&self) -> RedisStore {
        RedisStore::connect(self.redis_config()).unwrap()
    }

    fn router(&self) -> RouterWorker {
        self.router_with(1)
    }

    /// A router worker creating `palaver.inbound` and `palaver.push` with
    /// `partitions` partitions.
    fn router_with(&self, partitions: i32) -> RouterWorker {
        let mut config = WorkerConfig::new(&self.brokers, self.redis_config());
        config.inbound_partitions = partitions;
        RouterWorker::new(config).expect("router")
    }

    /// One inbound request from `user`'s `device` (never a live session).
    fn request(&mut self, user: &str, device: &str, key: &str, body: Body) {
        self.request_id += 1;
        let record = kafka::inbound_record(&Inbound {
            from: Session {
                user_id: user.into(),
                device_id: device.into(),
                addr: SessionAddr {
                    gateway_id: "gwx".into(),
                    conn: 7,
                },
            },
            request_id: self.request_id,
            body,
            received_ms: 1,
        })
        .encode_to_vec();
        self.producer
            .send(BaseRecord::to(INBOUND_TOPIC).key(key).payload(&record))
            .map_err(|(e, _)| e)
            .unwrap();
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    fn register_bob(&mut self) {
        self.register_apns("bob", BOB_TOKEN);
    }

    /// `user`'s iPhone registers its APNs token.
    fn register_apns(&mut self, user: &str, token: &str) {
        self.request(
            user,
            "phone",
            user,
            Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Apns.into(),
                token: token.into(),
                apns_environment: pb::ApnsEnvironment::Production.into(),
                apns_topic: TOPIC.into(),
                locale: String::new(),
            }),
        );
    }

    /// `user`'s Android phone registers its FCM token.
    fn register_fcm(&mut self, user: &str, token: &str) {
        self.request(
            user,
            "android",
            user,
            Body::RegisterPushToken(pb::RegisterPushToken {
                platform: pb::PushPlatform::Fcm.into(),
                token: token.into(),
                ..Default::default()
            }),
        );
    }

    /// `n` messages from `from` to bob.
    fn send_to_bob(&mut self, from: &str, n: u32) {
        self.send_to(from, "bob", n);
    }

    /// `n` messages from `from` to `to`.
    fn send_to(&mut self, from: &str, to: &str, n: u32) {
        let conversation = dm(from, to);
        for i in 0..n {
            let id = self.request_id + 1;
            self.request(
                from,
                "laptop",
                &conversation,
                Body::Send(pb::Send {
                    conversation_id: conversation.clone(),
                    client_msg_id: u128::from(id).to_be_bytes().to_vec(),
                    kind: pb::ContentKind::Text as i32,
                    body: format!("secret body {from} {i}").into_bytes(),
                    ..Default::default()
                }),
            );
        }
    }
}

/// A push worker on its own thread, its counters published after each batch.
struct Running {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<PushWorkerStats>>,
    handle: thread::JoinHandle<PushWorker>,
}

impl Running {
    fn spawn(mut worker: PushWorker) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(PushWorkerStats::default()));
        let (flag, shared) = (stop.clone(), stats.clone());
        let handle = thread::spawn(move || {
            let mut pause = Duration::from_millis(20);
            while !flag.load(Ordering::Relaxed) {
                match worker.run_batch(Duration::from_millis(100)) {
                    Ok(_) => pause = Duration::from_millis(20),
                    Err(_) => {
                        // The loop's own backoff, as ConsumerLoop::run does.
                        thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
                *shared.lock().unwrap() = worker.stats();
            }
            worker
        });
        Running {
            stop,
            stats,
            handle,
        }
    }

    fn stats(&self) -> PushWorkerStats {
        *self.stats.lock().unwrap()
    }

    fn stop(self) -> PushWorker {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Successful pushes to bob's token for `conversation`.
fn pushes_for(apns: &ApnsTestServer, conversation: &str) -> Vec<ApnsReceived> {
    apns.received()
        .into_iter()
        .filter(|r| {
            r.device_token == BOB_TOKEN
                && r.status == Some(200)
                && r.header("apns-collapse-id") == Some(conversation)
        })
        .collect()
}

#[test]
fn an_offline_phone_gets_one_push_per_burst_none_when_muted_loses_a_dead_token_and_misses_nothing_in_an_outage(
) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("palaver_push=info,palaver_router=warn")
        .with_test_writer()
        .try_init();
    let mut rig = Rig::start();
    let stop_router = Arc::new(AtomicBool::new(false));
    let router = {
        let mut router = rig.router();
        let stop = stop_router.clone();
        thread::spawn(move || router.run(&stop))
    };
    let mut store = rig.store();

    // The APNs test server, and a sender that gives up quickly in an
    // outage (so the batch fails and replays within the test).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = TestKeyPair::apns();
    let mut server_config = ApnsServerConfig::new("TEAM123456", "KEY1234567", &key.public_pem);
    server_config.topics = vec![TOPIC.into()];
    let apns = runtime
        .block_on(ApnsTestServer::start(server_config))
        .unwrap();
    let client =
        ApnsClient::new(apns.client_config("KEY1234567", &key.private_pem).unwrap()).unwrap();
    let sender = Sender::builder(SenderConfig {
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(300),
        min_retry_window: Duration::from_millis(500),
        max_retry_window: Duration::from_secs(1),
        ..SenderConfig::default()
    })
    .apns(ApnsEnvironment::Production, client)
    .start(runtime.handle());

    // 1. Bob's phone registers (through the router) and is offline; alice
    //    sends 5 messages. The worker starts once all 5 are stored, so the
    //    badge it reads is 5.
    rig.register_bob();
    await_until("bob's token stored", || {
        store.push_tokens("bob").unwrap().len() == 1
    });
    let alice = dm("alice", "bob");
    rig.send_to_bob("alice", 5);
    await_until("alice's 5 messages stored", || {
        store.last_seqs(std::slice::from_ref(&alice)).unwrap()[0] == 5
    });
    let mut config = PushWorkerConfig::new(&rig.brokers, rig.redis_config());
    config.partitions = 1;
    config.consumer.retry_backoff = Duration::from_millis(20);
    let worker = Running::spawn(PushWorker::new(config, sender).expect("push worker"));

    // A fence: a later event of the same partition; once its push is in,
    // everything before it was handled.
    let mut fences = 0;
    let mut fence = |rig: &mut Rig, apns: &ApnsTestServer| {
        fences += 1;
        let from = format!("fence{fences}");
        rig.send_to_bob(&from, 1);
        let conversation = dm(&from, "bob");
        await_until(&format!("the push of {from}"), || {
            !pushes_for(apns, &conversation).is_empty()
        });
    };
    await_until("the push of alice's burst", || {
        !pushes_for(&apns, &alice).is_empty()
    });
    fence(&mut rig, &apns);
    let pushes = pushes_for(&apns, &alice);
    assert_eq!(pushes.len(), 1, "one push for the burst of 5: {pushes:?}");
    let push = &pushes[0];
    assert_eq!(push.header("apns-topic"), Some(TOPIC));
    assert_eq!(push.header("apns-push-type"), Some("alert"));
    assert_eq!(push.payload["aps"]["badge"], 5, "{}", push.payload);
    assert_eq!(push.payload["palaver"]["conversation"], alice.as_str());
    assert_eq!(
        push.payload["aps"]["alert"].get("body"),
        None,
        "id-only: no body"
    );
    assert!(
        !push.payload.to_string().contains("secret body"),
        "{}",
        push.payload
    );

    // 2. A muted conversation: no push.
    let muted = dm("dave", "bob");
    rig.request(
        "bob",
        "phone",
        &muted,
        Body::MuteConversation(pb::MuteConversation {
            conversation_id: muted.clone(),
            muted_until_ms: 0,
            forever: true,
        }),
    );
    await_until("bob's mute stored", || {
        store.mute_of("bob", &muted, unix_ms()).unwrap().is_some()
    });
    rig.send_to_bob("dave", 3);
    fence(&mut rig, &apns);
    assert_eq!(pushes_for(&apns, &muted).len(), 0, "muted: no push");
    assert!(worker.stats().skipped_muted >= 1, "{:?}", worker.stats());

    // 3. APNs says bob's token is dead (410 with a time after its
    //    registration): the token leaves the store; a re-registration
    //    restores pushes.
    // The 410's time is now: seconds after the registration.
    apns.script(BOB_TOKEN, [ApnsReply::unregistered(unix_ms())]);
    rig.send_to_bob("erin", 1);
    await_until("bob's dead token removed", || {
        store.push_tokens("bob").unwrap().is_empty()
    });
    assert_eq!(pushes_for(&apns, &dm("erin", "bob")).len(), 0);
    assert_eq!(worker.stats().invalidated, 1, "{:?}", worker.stats());
    rig.register_bob();
    await_until("bob's token stored again", || {
        store.push_tokens("bob").unwrap().len() == 1
    });
    rig.send_to_bob("frank", 2);
    await_until("a push after the re-registration", || {
        pushes_for(&apns, &dm("frank", "bob")).len() == 1
    });

    // 4. An APNs outage while events arrive: the sender's retries run out,
    //    the batch fails and replays; after the outage every event's push
    //    arrives exactly once.
    apns.set_down(true);
    let senders = ["g1", "g2", "g3", "g4"];
    for from in senders {
        rig.send_to_bob(from, 2);
    }
    let replays_before = worker.stats().replays;
    await_until("two replays in the outage", || {
        worker.stats().replays >= replays_before + 2
    });
    assert!(apns.refused() > 0, "connections refused in the outage");
    apns.set_down(false);
    await_until("every outage push delivered", || {
        senders
            .iter()
            .all(|from| !pushes_for(&apns, &dm(from, "bob")).is_empty())
    });
    fence(&mut rig, &apns);
    for from in senders {
        let got = pushes_for(&apns, &dm(from, "bob"));
        assert_eq!(got.len(), 1, "{from}: exactly one push: {got:?}");
    }
    // Nothing sent twice anywhere.
    for from in ["alice", "fence1", "fence2", "fence3", "frank"] {
        assert_eq!(pushes_for(&apns, &dm(from, "bob")).len(), 1, "{from}");
    }

    let worker = worker.stop();
    let stats = worker.stats();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(stats.no_provider, 0, "{stats:?}");
    assert!(stats.pushed >= 9, "{stats:?}");

    // 5. A worker without any provider (its own group, so it reads every
    //    event again): it consumes everything and counts what it would have
    //    sent — the 11 events (alice, dave, erin, frank, g1–g4, three
    //    fences) but dave's muted one, each to bob's phone.
    let mut config = PushWorkerConfig::new(&rig.brokers, rig.redis_config());
    config.partitions = 1;
    config.consumer.group_id = "palaver-push-dry".into();
    let nothing = Sender::builder(SenderConfig::default()).start(runtime.handle());
    let dry = Running::spawn(PushWorker::new(config, nothing).expect("dry worker"));
    let began = Instant::now();
    while dry.stats().events < 11 {
        assert!(
            began.elapsed() < LIMIT,
            "the dry worker read all 11 events: {:?}",
            dry.stats()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let dry = dry.stop();
    let stats = dry.stats();
    assert_eq!(
        (stats.no_provider, stats.skipped_muted, stats.pushed),
        (10, 1, 0),
        "{stats:?}"
    );
    assert_eq!(
        dry.loop_stats().replays,
        0,
        "nothing to replay: {:?}",
        dry.loop_stats()
    );
    stop_router.store(true, Ordering::Relaxed);
    router.join().unwrap();
}

/// An Android phone through FCM, with the preview policy: one push per
/// burst with the conversation's collapse key and tag, the badge, the
/// sender as title and no body; FCM's UNREGISTERED removes the token.
#[test]
fn an_android_phone_gets_one_preview_push_per_burst_through_fcm_and_unregistered_removes_its_token()
{
    const ZOE_TOKEN: &str = "zoe-fcm:APA91b-token_1";
    let mut rig = Rig::start();
    let stop_router = Arc::new(AtomicBool::new(false));
    let router = {
        let mut router = rig.router();
        let stop = stop_router.clone();
        thread::spawn(move || router.run(&stop))
    };
    let mut store = rig.store();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rsa = TestKeyPair::rsa();
    let fcm = runtime
        .block_on(FcmTestServer::start(FcmServerConfig::new(
            "palaver-test",
            "push@palaver-test.iam.gserviceaccount.com",
            &rsa.public_pem,
        )))
        .unwrap();
    let client = FcmClient::new(fcm.client_config(&rsa.private_pem).unwrap()).unwrap();
    let sender = Sender::builder(SenderConfig::default())
        .fcm(client)
        .start(runtime.handle());

    rig.register_fcm("zoe", ZOE_TOKEN);
    await_until("zoe's token stored", || {
        store.push_tokens("zoe").unwrap().len() == 1
    });
    let yan = dm("yan", "zoe");
    rig.send_to("yan", "zoe", 3);
    await_until("yan's 3 messages stored", || {
        store.last_seqs(std::slice::from_ref(&yan)).unwrap()[0] == 3
    });
    let mut config = PushWorkerConfig::new(&rig.brokers, rig.redis_config());
    config.partitions = 1;
    config.content = ContentPolicy::Preview;
    let worker = Running::spawn(PushWorker::new(config, sender).expect("push worker"));
    let delivered = |conversation: &str| -> Vec<serde_json::Value> {
        fcm.received()
            .into_iter()
            .filter(|r| {
                r.status == Some(200)
                    && r.message["message"]["android"]["collapse_key"] == conversation
            })
            .map(|r| r.message["message"].clone())
            .collect()
    };
    await_until("yan's push", || !delivered(&yan).is_empty());
    // A fence: a later event on the same partition.
    rig.send_to("fence", "zoe", 1);
    await_until("the fence's push", || {
        !delivered(&dm("fence", "zoe")).is_empty()
    });
    let got = delivered(&yan);
    assert_eq!(got.len(), 1, "one push for the burst of 3: {got:?}");
    let m = &got[0];
    assert_eq!(m["token"], ZOE_TOKEN);
    assert_eq!(m["android"]["notification"]["tag"], yan.as_str());
    assert_eq!(m["android"]["notification"]["notification_count"], 3);
    assert_eq!(m["data"]["badge"], "3");
    assert_eq!(m["notification"]["title"], "yan");
    assert_eq!(m["notification"]["body"], "New message");
    assert!(!m.to_string().contains("secret body"), "{m}");

    // FCM says the token is gone: it leaves the store.
    fcm.script(ZOE_TOKEN, [FcmReply::unregistered()]);
    rig.send_to("xia", "zoe", 1);
    await_until("zoe's dead token removed", || {
        store.push_tokens("zoe").unwrap().is_empty()
    });

    let worker = worker.stop();
    let stats = worker.stats();
    assert_eq!((stats.pushed, stats.invalidated), (2, 1), "{stats:?}");
    stop_router.store(true, Ordering::Relaxed);
    router.join().unwrap();
}

/// A `palaver-push` process (the real binary), SIGKILLed when dropped.
struct PushProcess(std::process::Child);

impl PushProcess {
    fn spawn(rig: &Rig, providers: &std::path::Path, name: &str, logs: &std::path::Path) -> Self {
        let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_palaver-push"))
            .args(["--brokers", &rig.brokers, "--redis", &rig.redis.url()])
            .arg("--providers")
            .arg(providers)
            .args(["--worker-id", name, "--max-batch", "20"])
            .env("RUST_LOG", "palaver_push=info,palaver_router=info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("palaver-push starts");
        PushProcess(child)
    }

    /// SIGKILL (std's `Child::kill` on Unix), and reaped.
    fn sigkill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for PushProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Two `palaver-push` processes in one consumer group share `palaver.push`
/// (4 partitions); one is SIGKILLed while events flow and a third joins.
/// Every event still ends in a push at the APNs test server: the killed
/// worker's partitions go to the others, which resume from its last
/// committed offsets. Duplicates are possible (at least once: pushes sent
/// but not yet committed when it died are sent again); each one carries
/// the same collapse id and seq as the first, so the phone replaces the
/// notification instead of showing it twice.
#[test]
fn a_push_worker_sigkilled_mid_stream_is_replaced_and_no_event_is_lost() {
    const USERS: usize = 240;
    let mut rig = Rig::start();
    let stop_router = Arc::new(AtomicBool::new(false));
    let router = {
        let mut router = rig.router_with(4);
        let stop = stop_router.clone();
        thread::spawn(move || router.run(&stop))
    };
    let mut store = rig.store();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = TestKeyPair::apns();
    let mut server_config = ApnsServerConfig::new("TEAM123456", "KEY1234567", &key.public_pem);
    server_config.topics = vec![TOPIC.into()];
    let apns = runtime
        .block_on(ApnsTestServer::start(server_config))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("palaver-push-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let providers = apns.write_providers(&dir, &key).unwrap();

    let user = |i: usize| format!("u{i}");
    let token = |i: usize| format!("{:064x}", 0xa000 + i);
    for i in 0..USERS {
        rig.register_apns(&user(i), &token(i));
    }
    await_until("every token stored", || {
        (0..USERS).all(|i| store.push_tokens(&user(i)).unwrap().len() == 1)
    });

    let mut a = PushProcess::spawn(&rig, &providers, "push-a", &dir);
    let _b = PushProcess::spawn(&rig, &providers, "push-b", &dir);
    let delivered_to = |i: usize| -> Vec<ApnsReceived> {
        apns.received()
            .into_iter()
            .filter(|r| r.device_token == token(i) && r.status == Some(200))
            .collect()
    };
    // One event per user, paced (the load, not a wait for anything): once
    // both workers are sending (each holds its one HTTP/2 connection to
    // APNs) and a third of the events are out, worker A dies while the
    // rest keep flowing, and worker C joins the group.
    let mut at_kill = 0;
    let mut _c = None;
    for i in 0..USERS {
        rig.send_to("sender", &user(i), 1);
        if i == USERS / 3 {
            await_until("both workers sending", || apns.connections() >= 2);
            a.sigkill();
            at_kill = apns.delivered();
            _c = Some(PushProcess::spawn(&rig, &providers, "push-c", &dir));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let began = Instant::now();
    loop {
        let missing: Vec<usize> = (0..USERS).filter(|&i| delivered_to(i).is_empty()).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            began.elapsed() < LIMIT * 2,
            "no push for {} users after the kill (first: u{}); worker logs in {}",
            missing.len(),
            missing[0],
            dir.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let mut duplicates = 0;
    for i in 0..USERS {
        let got = delivered_to(i);
        let conversation = dm("sender", &user(i));
        for push in &got {
            assert_eq!(push.header("apns-collapse-id"), Some(conversation.as_str()));
            assert_eq!(push.payload["palaver"]["seq"], 1, "{}", push.payload);
        }
        duplicates += got.len() - 1;
    }
    eprintln!(
        "{USERS} events, {} pushes delivered ({at_kill} before the kill), {duplicates} duplicates \
         (same collapse id and seq as the first: replaced on the phone)",
        apns.delivered()
    );
    stop_router.store(true, Ordering::Relaxed);
    router.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
