//! Heap allocations per Send on the message path, counted exactly by a
//! counting global allocator (so the numbers do not depend on machine load:
//! run it anywhere, debug or release, and compare).
//!
//! Two paths, three conversations each, Sends handed over in batches of 1
//! and of 64 (what one gateway turn hands the engine at low and high load):
//!
//! - `router`: `Router::handle_batch` over a `MemoryStore`, then
//!   `Output::flush` into an outlet that drops the frames (the router
//!   tier's shape, minus Kafka and Redis). The `Inbound`s are built before
//!   counting starts.
//! - `engine`: the embedded engine as `palaver-gateway` runs it (hosted,
//!   turns driven here), end to end: each `Inbound` built the way a gateway
//!   core builds it (its `Session` from the connection's ids, the decoded
//!   `Send`'s three buffers, a fresh request Vec per hand-over), then
//!   `submit_batch`, the engine's turns, and a sink that drops the frames.
//!
//! Conversations: `dm online` (alice → bob, one device each), `dm offline`
//! (alice → carol, who never connected: a push event the first time, then
//! coalesced), `group 20` (alice and 19 others, all online, one device
//! each). Every conversation is warmed up past its history window first,
//! so the counts are those of a busy steady state.
//!
//! An allocation is a call to `alloc` or `realloc`; bytes are the sizes
//! requested (a `realloc` counts its new size).
//!
//! ```text
//! cargo run --release -p palaver-router --example allocs_per_message
//! ```
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
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

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Counts every allocation of the process (this example runs one thread:
/// the hosted engine has none of its own).
struct Counting;

#[allow(unsafe_code)] // a counting allocator wraps the system's
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(l.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new as u64, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn counters() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

const GATEWAY: &str = "gw-1";
/// The gateway id a gateway core shares with every `Session` it builds.
static GATEWAY_ID: LazyLock<Arc<str>> = LazyLock::new(|| GATEWAY.into());
const BATCHES: [usize; 2] = [1, 64];
/// Sends counted per (case, batch size): a multiple of every batch size.
const COUNTED: usize = 10_240;
/// Sends before counting: past the default 10,000-message history window,
/// so the window is full and recycles its chunks as in a busy conversation.
const WARM_UP: usize = 10_240;
const BODY: &[u8] = b"a chat message of a typical length, some sixty bytes long....";

/// Connection keys, one per user (one device each).
fn conn_of(user: &str, users: &[String]) -> u64 {
    users.iter().position(|u| u == user).expect("known user") as u64 + 1
}

/// The session a gateway core builds for a request from `user`'s connection
/// (`SessionIds::session` in the gateway: the ids it keeps, its shared
/// gateway id).
fn session(user: &str, conn: u64) -> Session {
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
fn send(conversation_id: &str, n: u64) -> Body {
    let mut client_msg_id = [0u8; 16];
    client_msg_id[..8].copy_from_slice(&n.to_le_bytes());
    Body::Send(pb::Send {
        conversation_id: conversation_id.to_owned(),
        client_msg_id: client_msg_id.to_vec(),
        kind: pb::ContentKind::Text as i32,
        body: BODY.to_vec(),
        reply_to_seq: 0,
        media: None,
    })
}

struct Case {
    name: &'static str,
    conversation_id: String,
}

/// Who exists: alice and bob online, carol never connected, and nineteen
/// group members online.
struct World {
    users: Vec<String>,
    online: Vec<String>,
    group_members: Vec<String>,
}

impl World {
    fn new() -> Self {
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

    fn sessions(&self) -> Vec<Session> {
        self.online
            .iter()
            .map(|u| session(u, conn_of(u, &self.users)))
            .collect()
    }

    fn create_group(&self) -> Inbound {
        Inbound {
            from: session("alice", conn_of("alice", &self.users)),
            request_id: 1,
            body: Body::CreateConversation(pb::CreateConversation {
                kind: pb::ConversationKind::Group as i32,
                title: "twenty".into(),
                member_user_ids: self.group_members.clone(),
            }),
            received_ms: 0,
        }
    }

    fn cases(&self, group_id: String) -> [Case; 3] {
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

fn created_group_id(frames: impl IntoIterator<Item = pb::Frame>) -> String {
    frames
        .into_iter()
        .find_map(|f| match f.body {
            Some(Body::ConversationCreated(c)) => c.conversation.map(|c| c.conversation_id),
            _ => None,
        })
        .expect("the group was created")
}

/// Drops what it is given (the router tier would encode it for Kafka).
struct NullOutlet;

impl Outlet for NullOutlet {
    fn deliver(&mut self, _gateway_id: &str, frames: Vec<Outbound>) -> Result<(), BusError> {
        drop(frames);
        Ok(())
    }
    fn push(&mut self, events: Vec<PushEvent>) -> Result<(), BusError> {
        drop(events);
        Ok(())
    }
}

/// Keeps the last frames it saw (dropping the previous ones): enough to
/// find the group's id at setup.
#[derive(Default)]
struct DropSink {
    last: std::sync::Mutex<Vec<Outbound>>,
}

impl DeliverySink for DropSink {
    fn deliver(&self, batch: Vec<Outbound>) {
        *self.last.lock().unwrap() = batch;
    }
    // The embedded engine never loses sessions.
    fn reopen_sessions(&self) {}
}

struct NullPush;

impl PushSink for NullPush {
    fn push(&mut self, events: Vec<PushEvent>) {
        drop(events);
    }
}

/// One row of the table: allocations and bytes per Send.
struct Row {
    path: &'static str,
    case: &'static str,
    batch: usize,
    allocs: f64,
    bytes: f64,
}

impl Row {
    /// Runs `round` (one batch of `batch` Sends; returns the allocations
    /// and bytes it made) for the warm-up, then for the counted Sends.
    fn measure(
        path: &'static str,
        case: &'static str,
        batch: usize,
        mut round: impl FnMut() -> (u64, u64),
    ) -> Row {
        for _ in 0..WARM_UP / batch {
            round();
        }
        let (mut allocs, mut bytes) = (0, 0);
        for _ in 0..COUNTED / batch {
            let (a, b) = round();
            allocs += a;
            bytes += b;
        }
        Row {
            path,
            case,
            batch,
            allocs: allocs as f64 / COUNTED as f64,
            bytes: bytes as f64 / COUNTED as f64,
        }
    }
}

fn measure_router(world: &World, rows: &mut Vec<Row>) {
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

    let alice = session("alice", conn_of("alice", &world.users));
    let mut n = 0u64;
    for case in world.cases(group_id) {
        for batch in BATCHES {
            let round = || {
                let requests: Vec<Inbound> = (0..batch)
                    .map(|i| {
                        n += 1;
                        Inbound {
                            from: alice.clone(),
                            request_id: i as u32 + 1,
                            body: send(&case.conversation_id, n),
                            received_ms: 0,
                        }
                    })
                    .collect();
                let before = counters();
                let mut progress = BatchProgress::default();
                router
                    .handle_batch(&requests, &mut out, &mut progress)
                    .unwrap();
                out.flush(&mut NullOutlet).unwrap();
                let after = counters();
                drop(requests);
                (after.0 - before.0, after.1 - before.1)
            };
            rows.push(Row::measure("router", case.name, batch, round));
        }
    }
}

fn measure_engine(world: &World, rows: &mut Vec<Row>) {
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

    let alice_conn = conn_of("alice", &world.users);
    let mut n = 1_000_000u64;
    for case in world.cases(group_id) {
        for batch in BATCHES {
            let round = || {
                let before = counters();
                let mut requests = Vec::with_capacity(batch.max(4));
                for i in 0..batch {
                    n += 1;
                    requests.push(Inbound {
                        from: session("alice", alice_conn),
                        request_id: i as u32 + 1,
                        body: send(&case.conversation_id, n),
                        received_ms: 0,
                    });
                }
                engine.submit_batch(requests);
                while host.run_turn() {}
                let after = counters();
                (after.0 - before.0, after.1 - before.1)
            };
            rows.push(Row::measure("engine", case.name, batch, round));
        }
    }
    engine.shutdown();
}

fn main() {
    let world = World::new();
    let mut rows = Vec::new();
    measure_router(&world, &mut rows);
    measure_engine(&world, &mut rows);
    println!("heap allocations per Send ({COUNTED} Sends per row, after {WARM_UP} warm-up Sends)");
    println!();
    println!("| path   | conversation | batch | allocs/Send | bytes/Send |");
    println!("| ------ | ------------ | ----: | ----------: | ---------: |");
    for r in rows {
        println!(
            "| {:<6} | {:<12} | {:>5} | {:>11.2} | {:>10.1} |",
            r.path, r.case, r.batch, r.allocs, r.bytes
        );
    }
}
