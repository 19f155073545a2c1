//! The message path as the per-message examples drive it
//! (`allocs_per_message`, `instructions_per_message`): who exists, the three
//! conversations, and the two paths — the router tier's batch path
//! (`RouterPath`) and the embedded engine end to end (`EnginePath`) — each
//! warmed up the same way, so both examples count the same work.
// Each example uses its own subset.
#![allow(dead_code)]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::{Inbound, Outbound, Session, SessionAddr};
use palaver_router::bus::{BusError, Outlet, Output, PushEvent};
use palaver_router::logic::BatchProgress;
use palaver_router::store::SessionChange;
use palaver_router::{
    Backend, DeliverySink, EmbeddedConfig, EmbeddedEngine, ManualClock, MemoryStore, PushSink,
    Router, RouterConfig,
};

pub const GATEWAY: &str = "gw-1";
/// The gateway id a gateway core shares with every `Session` it builds.
pub static GATEWAY_ID: LazyLock<Arc<str>> = LazyLock::new(|| GATEWAY.into());
pub const BATCHES: [usize; 2] = [1, 64];
/// Sends counted per (case, batch size): a multiple of every batch size.
pub const COUNTED: usize = 10_240;
/// Sends before counting: past the default 10,000-message history window,
/// so the window is full and recycles its chunks as in a busy conversation.
pub const WARM_UP: usize = 10_240;
pub const BODY: &[u8] = b"a chat message of a typical length, some sixty bytes long....";

/// Connection keys, one per user (one device each).
pub fn conn_of(user: &str, users: &[String]) -> u64 {
    users.iter().position(|u| u == user).expect("known user") as u64 + 1
}

/// The session a gateway core builds for a request from `user`'s connection
/// (`SessionIds::session` in the gateway: the ids it keeps, its shared
/// gateway id).
pub fn session(user: &str, conn: u64) -> Session {
    Session {
        user_id: user.to_owned(),
        device_id: "phone".to_owned(),
        addr: SessionAddr {
            gateway_id: GATEWAY_ID.clone(),
            conn,
        },
    }
}

/// A Send as the gateway's decoder yields it (three buffers of its own).
pub fn send(conversation_id: &str, n: u64) -> Body {
    let mut client_msg_id = [0u8; 16];
    client_msg_id[..8].copy_from_slice(&n.to_le_bytes());
    Body::Send(pb::Send {
        conversation_id: conversation_id.to_owned(),
        client_msg_id: client_msg_id.to_vec(),
        kind: pb::ContentKind::Text as i32,
        body: BODY.to_vec(),
        reply_to_seq: 0,
        media: None,
        mention_user_ids: Vec::new(),
    })
}

pub struct Case {
    pub name: &'static str,
    pub conversation_id: String,
}

/// Who exists: alice and bob online, carol never connected, and nineteen
/// group members online.
pub struct World {
    pub users: Vec<String>,
    online: Vec<String>,
    group_members: Vec<String>,
}

impl World {
    pub fn new() -> Self {
        let group_members: Vec<String> = (1..20).map(|i| format!("member{i:02}")).collect();
        let mut online = vec!["alice".to_owned(), "bob".to_owned()];
        online.extend(group_members.iter().cloned());
        let mut users = online.clone();
        users.push("carol".to_owned());
        World {
            users,
            online,
            group_members,
        }
    }

    pub fn sessions(&self) -> Vec<Session> {
        self.online
            .iter()
            .map(|u| session(u, conn_of(u, &self.users)))
            .collect()
    }

    pub fn create_group(&self) -> Inbound {
        Inbound {
            from: session("alice", conn_of("alice", &self.users)),
            request_id: 1,
            body: Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Group as i32,
                title: "twenty".into(),
                member_user_ids: self.group_members.clone(),
                channel: None,
            }),
            received_ms: 0,
        }
    }

    pub fn cases(&self, group_id: String) -> [Case; 3] {
        [
            Case {
                name: "dm online",
                conversation_id: "dm:alice:bob".into(),
            },
            Case {
                name: "dm offline",
                conversation_id: "dm:alice:carol".into(),
            },
            Case {
                name: "group 20",
                conversation_id: group_id,
            },
        ]
    }
}

pub fn created_group_id(frames: impl IntoIterator<Item = pb::Frame>) -> String {
    frames
        .into_iter()
        .find_map(|f| match f.body {
            Some(Body::ConversationCreated(c)) => c.conversation.map(|c| c.conversation_id),
            _ => None,
        })
        .expect("the group was created")
}

/// Drops what it is given (the router tier would encode it for Kafka).
pub struct NullOutlet;

impl Outlet for NullOutlet {
    fn deliver(&mut self, _gateway_id: &str, frames: Vec<Outbound>) -> Result<(), BusError> {
        drop(frames);
        Ok(())
    }
    fn push(&mut self, events: Vec<PushEvent>) -> Result<(), BusError> {
        drop(events);
        Ok(())
    }
    fn archive(&mut self, stored: Vec<palaver_protocol::pb::Message>) -> Result<(), BusError> {
        drop(stored);
        Ok(())
    }
    fn broadcast(&mut self, posts: Vec<palaver_router::ChannelPost>) -> Result<(), BusError> {
        drop(posts);
        Ok(())
    }
}

/// Keeps the last frames it saw (dropping the previous ones): enough to
/// find the group's id at setup.
#[derive(Default)]
pub struct DropSink {
    pub last: std::sync::Mutex<Vec<Outbound>>,
}

impl DeliverySink for DropSink {
    fn deliver(&self, batch: Vec<Outbound>) {
        *self.last.lock().unwrap() = batch;
    }
    fn deliver_channel(&self, posts: Vec<std::sync::Arc<palaver_router::ChannelPost>>) {
        drop(posts);
    }
    // The embedded engine never loses sessions.
    fn reopen_sessions(&self) {}
}

pub struct NullPush;

impl PushSink for NullPush {
    fn push(&mut self, events: Vec<PushEvent>) {
        drop(events);
    }
}

/// The router tier's shape minus Kafka and Redis: `Router::handle_batch`
/// over a `MemoryStore`, then `Output::flush` into an outlet that drops the
/// frames.
pub struct RouterPath {
    router: Router<MemoryStore>,
    out: Output,
    alice: Session,
    n: u64,
    pub cases: [Case; 3],
}

impl RouterPath {
    pub fn new(world: &World) -> Self {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let mut router = Router::new(MemoryStore::new(), RouterConfig::default(), clock);
        let mut out = Output::default();
        let changes: Vec<SessionChange> = world
            .sessions()
            .into_iter()
            .map(SessionChange::Opened)
            .collect();
        router
            .apply_session_changes(&changes, Duration::from_secs(3600), &mut out)
            .unwrap();
        router.handle(&world.create_group(), &mut out).unwrap();
        let group_id = created_group_id(out.frames.drain(..).map(|a| a.frame));
        out.pushes.clear();
        RouterPath {
            router,
            out,
            alice: session("alice", conn_of("alice", &world.users)),
            n: 0,
            cases: world.cases(group_id),
        }
    }

    /// `batch` Sends from alice to `conversation_id`, as the router worker
    /// receives them (built outside what is counted).
    pub fn prepare(&mut self, conversation_id: &str, batch: usize) -> Vec<Inbound> {
        (0..batch)
            .map(|i| {
                self.n += 1;
                Inbound {
                    from: self.alice.clone(),
                    request_id: i as u32 + 1,
                    body: send(conversation_id, self.n),
                    received_ms: 0,
                }
            })
            .collect()
    }

    /// One poll batch: handled, its output flushed.
    pub fn run(&mut self, requests: &[Inbound]) {
        let mut progress = BatchProgress::default();
        self.router
            .handle_batch(requests, &mut self.out, &mut progress)
            .unwrap();
        self.out.flush(&mut NullOutlet).unwrap();
    }
}

/// The embedded engine as `palaver-gateway` runs it (hosted, turns driven
/// here), end to end: each `Inbound` built the way a gateway core builds
/// it, `submit_batch`, the engine's turns, a sink that drops the frames.
pub struct EnginePath {
    engine: EmbeddedEngine,
    host: Box<dyn palaver_router::BackendHost>,
    alice_conn: u64,
    n: u64,
    pub cases: [Case; 3],
}

impl EnginePath {
    pub fn new(world: &World) -> Self {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let engine = EmbeddedEngine::hosted_with_parts(EmbeddedConfig::default(), clock, NullPush);
        let sink = Arc::new(DropSink::default());
        engine.start(GATEWAY, sink.clone()).unwrap();
        let mut host = engine.take_host(Arc::new(|| {})).expect("hosted");
        for s in world.sessions() {
            engine.session_opened(&s);
        }
        while host.run_turn() {}
        engine.submit(world.create_group());
        while host.run_turn() {}
        let group_id = created_group_id(sink.last.lock().unwrap().drain(..).map(|o| o.frame));
        EnginePath {
            engine,
            host,
            alice_conn: conn_of("alice", &world.users),
            n: 1_000_000,
            cases: world.cases(group_id),
        }
    }

    /// `batch` Sends built, handed over, and every turn run.
    pub fn round(&mut self, conversation_id: &str, batch: usize) {
        let mut requests = Vec::with_capacity(batch.max(4));
        for i in 0..batch {
            self.n += 1;
            requests.push(Inbound {
                from: session("alice", self.alice_conn),
                request_id: i as u32 + 1,
                body: send(conversation_id, self.n),
                received_ms: 0,
            });
        }
        self.engine.submit_batch(requests);
        while self.host.run_turn() {}
    }

    pub fn shutdown(self) {
        self.engine.shutdown();
    }
}
