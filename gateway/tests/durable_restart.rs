//! The durable embedded engine on the real binary: `palaver-gateway`
//! processes (`palaver_testkit::stack::Gateway`) on one data dir, SIGKILLed
//! and started again.
//!
//! - Several senders stream a few thousand messages (pipelined, into one
//!   group and their own direct conversations); the gateway is SIGKILLed
//!   mid-stream and restarted on the same data dir; each sender reconnects
//!   and resends what was not acknowledged, with the same client_msg_id.
//!   Every message that got a SendAck is stored at the seq of its ack,
//!   seqs are 1..=N without a gap or a reuse, each sender's messages in its
//!   send order, and a reader Syncs and pages History through all of them.
//! - 50,000 messages in one conversation, the gateway SIGKILLed and
//!   restarted, then History pages from the newest back to seq 1 in order.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use palaver_gateway::{auth, devcerts};
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::client::{new_client_msg_id, Client, ConnectOptions};
use palaver_testkit::stack::{Gateway, WorkDir};

const T: Duration = Duration::from_secs(30);

/// Limits out of the way: this is about storage, not about throttling.
const CONFIG: &str = "\
[limits]
max_sends_per_second = 1000000
max_account_sends_per_second = 1000000
max_requests_per_second = 1000000
max_account_requests_per_second = 1000000
";

/// The gateway process of the moment, on one data dir.
struct Node {
    work: WorkDir,
    data: PathBuf,
    gateway: Option<Gateway>,
    starts: usize,
}

impl Node {
    fn start(label: &str) -> Node {
        let work = WorkDir::temp(label).unwrap();
        let data = work.path().join("data");
        let mut node = Node {
            work,
            data,
            gateway: None,
            starts: 0,
        };
        node.restart();
        node
    }

    /// Starts a gateway on the data dir (the previous one must be dead).
    fn restart(&mut self) {
        self.starts += 1;
        let id = format!("gw{}", self.starts);
        let gateway = Gateway::start(self.work.path(), &id, CONFIG, &self.data)
            .unwrap_or_else(|e| panic!("{id} starts on {}: {e}", self.data.display()));
        self.gateway = Some(gateway);
    }

    /// SIGKILL, and the process is reaped (its store's lock is gone).
    fn kill(&mut self) {
        if let Some(mut gateway) = self.gateway.take() {
            gateway.kill();
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.as_ref().expect("a gateway runs").addr()
    }

    fn login(&self, user: &str, device: &str) -> Client {
        login(&self.data, self.addr(), user, device, Vec::new())
    }
}

fn login(
    data: &Path,
    addr: SocketAddr,
    user: &str,
    device: &str,
    resume: Vec<pb::Cursor>,
) -> Client {
    try_login(data, addr, user, device, resume).unwrap_or_else(|e| panic!("{user} logs in: {e}"))
}

fn try_login(
    data: &Path,
    addr: SocketAddr,
    user: &str,
    device: &str,
    resume: Vec<pb::Cursor>,
) -> Result<Client, String> {
    let ca = std::fs::read(data.join(devcerts::CA_CERT_FILE)).map_err(|e| e.to_string())?;
    let secret =
        devcerts::read_secret(&data.join(devcerts::JWT_SECRET_FILE)).map_err(|e| e.to_string())?;
    let mut c = Client::connect(&ConnectOptions::new(addr, ca)).map_err(|e| e.to_string())?;
    c.hello_with(
        pb::Hello {
            protocol_version: palaver_protocol::PROTOCOL_VERSION,
            token: auth::mint_hs256(&secret, user, None, 3600),
            device_id: device.into(),
            client_name: "durable-test".into(),
            client_version: "0".into(),
            resume,
        },
        T,
    )
    .map_err(|e| e.to_string())?;
    Ok(c)
}

fn send_body(conversation_id: &str, client_msg_id: &[u8], body: &str) -> Body {
    Body::Send(pb::Send {
        conversation_id: conversation_id.into(),
        client_msg_id: client_msg_id.to_vec(),
        kind: pb::ContentKind::Text as i32,
        body: body.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// One message a sender means to send, and the ack it got.
#[derive(Clone, Debug)]
struct Outgoing {
    conversation_id: String,
    client_msg_id: Vec<u8>,
    body: String,
    ack: Option<pb::SendAck>,
    /// How many times it was sent (1 unless the gateway died under it).
    sends: u32,
}

/// The address of the gateway of the moment: senders wait on it after
/// their connection dies.
#[derive(Default)]
struct Current {
    addr: Mutex<(usize, Option<SocketAddr>)>,
    changed: Condvar,
}

impl Current {
    fn set(&self, generation: usize, addr: Option<SocketAddr>) {
        *self.addr.lock().unwrap() = (generation, addr);
        self.changed.notify_all();
    }

    /// The address of a gateway newer than generation `seen`.
    fn newer_than(&self, seen: usize) -> (usize, SocketAddr) {
        let guard = self.addr.lock().unwrap();
        let (guard, timeout) = self
            .changed
            .wait_timeout_while(guard, T, |(g, a)| *g <= seen || a.is_none())
            .unwrap();
        assert!(!timeout.timed_out(), "no gateway came back");
        (guard.0, guard.1.unwrap())
    }
}

/// Acks counted by every sender, awaitable.
#[derive(Default)]
struct Acked {
    n: Mutex<usize>,
    more: Condvar,
}

impl Acked {
    fn add(&self) {
        *self.n.lock().unwrap() += 1;
        self.more.notify_all();
    }

    fn get(&self) -> usize {
        *self.n.lock().unwrap()
    }

    /// Waits until at least `n` acks were counted (false at the deadline).
    fn wait_for(&self, n: usize, patience: Duration) -> bool {
        let guard = self.n.lock().unwrap();
        let (_guard, timeout) = self
            .more
            .wait_timeout_while(guard, patience, |got| *got < n)
            .unwrap();
        !timeout.timed_out()
    }
}

/// Sends `out` in order, up to `window` unanswered at a time, reconnecting
/// to the next gateway (and resending what was not acknowledged, same
/// client_msg_id) when the connection dies. Counts acks in `acked`.
fn stream(
    data: &Path,
    current: &Current,
    user: &str,
    device: &str,
    mut out: Vec<Outgoing>,
    window: usize,
    acked: &Acked,
) -> Vec<Outgoing> {
    let (mut generation, addr) = current.newer_than(0);
    let mut c = login(data, addr, user, device, Vec::new());
    // Indexes to send, in order; request id → index of what is in flight.
    let mut todo: VecDeque<usize> = (0..out.len()).collect();
    let mut in_flight: BTreeMap<u32, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !todo.is_empty() || !in_flight.is_empty() {
        assert!(Instant::now() < deadline, "{user}: stream did not finish");
        let mut broken = false;
        while in_flight.len() < window {
            let Some(i) = todo.pop_front() else { break };
            let o = &mut out[i];
            o.sends += 1;
            match c.request(send_body(&o.conversation_id, &o.client_msg_id, &o.body)) {
                Ok(id) => {
                    in_flight.insert(id, i);
                }
                Err(_) => {
                    todo.push_front(i);
                    broken = true;
                    break;
                }
            }
        }
        if !broken {
            match c.recv(T) {
                Ok(Some(f)) => match (in_flight.remove(&f.request_id), f.body) {
                    (Some(i), Some(Body::SendAck(ack))) => {
                        assert_eq!(ack.client_msg_id, out[i].client_msg_id);
                        if let Some(first) = &out[i].ack {
                            // Acked twice (a resend after the restart of a
                            // message acked before): the same ack.
                            assert_eq!((first.seq, &first.message_id), (ack.seq, &ack.message_id));
                        } else {
                            acked.add();
                        }
                        out[i].ack = Some(ack);
                    }
                    (Some(i), Some(Body::Error(e)))
                        if e.code == pb::ErrorCode::Unavailable as u32 =>
                    {
                        todo.push_front(i);
                    }
                    (Some(i), other) => panic!("{user}: answer to send #{i}: {other:?}"),
                    // Deliveries of the group's messages, presence: not ours.
                    (None, _) => {}
                },
                Ok(None) => panic!("{user}: no answer in {T:?}"),
                Err(_) => broken = true,
            }
        }
        if broken {
            // The gateway died: what was in flight is sent again, first,
            // in its order, on a connection to the next gateway.
            let mut lost: Vec<usize> = in_flight.values().copied().collect();
            lost.sort_unstable();
            in_flight.clear();
            for i in lost.into_iter().rev() {
                todo.push_front(i);
            }
            let (g, addr) = current.newer_than(generation);
            generation = g;
            c = login(data, addr, user, device, Vec::new());
        }
    }
    out
}

/// Every message of `conversation_id` by History, newest page first back
/// to seq 1; returned ascending. Asserts each page is ascending, gapless
/// and ends right below the page before it.
fn history(c: &mut Client, conversation_id: &str, limit: u32) -> Vec<pb::Message> {
    let mut pages: Vec<Vec<pb::Message>> = Vec::new();
    let mut before = 0;
    loop {
        let id = c
            .request(Body::History(pb::History {
                conversation_id: conversation_id.into(),
                before_seq: before,
                limit,
            }))
            .unwrap();
        let f = c
            .recv_until(T, "HistoryPage", |f| f.request_id == id)
            .unwrap();
        let Some(Body::HistoryPage(page)) = f.body else {
            panic!("History answered {f:?}")
        };
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] + 1 == w[1]),
            "a page ascending and gapless: {seqs:?}"
        );
        let Some(&first) = seqs.first() else {
            panic!("an empty page below {before}")
        };
        if before != 0 {
            assert_eq!(seqs.last(), Some(&(before - 1)), "pages meet");
        }
        before = first;
        pages.push(page.messages);
        if !page.has_more {
            break;
        }
    }
    pages.into_iter().rev().flatten().collect()
}

/// Syncs everything the user has, as a client does: from `first` (the
/// batch a Hello with resume cursors started) or a Sync with no cursors,
/// then Sync again with a cursor for every conversation seen, until
/// `has_more` clears. Returns each conversation's messages, asserting each
/// batch continues right after its cursor.
fn sync_everything(
    c: &mut Client,
    first: Option<pb::SyncBatch>,
) -> BTreeMap<String, Vec<pb::Message>> {
    let mut got: BTreeMap<String, Vec<pb::Message>> = BTreeMap::new();
    let mut cursors: Vec<pb::Cursor> = Vec::new();
    let mut batch = first;
    for _ in 0..10_000 {
        let b = match batch.take() {
            Some(b) => b,
            None => {
                let id = c
                    .request(Body::Sync(pb::Sync {
                        cursors: cursors.clone(),
                        limit: 0,
                    }))
                    .unwrap();
                let f = c
                    .recv_until(T, "SyncBatch", |f| f.request_id == id)
                    .unwrap();
                let Some(Body::SyncBatch(b)) = f.body else {
                    panic!("Sync answered {f:?}")
                };
                b
            }
        };
        for conversation in b.conversations {
            got.entry(conversation.conversation_id).or_default();
        }
        for m in b.messages {
            let held = got.entry(m.conversation_id.clone()).or_default();
            let after = held.last().map_or(0, |l| l.seq);
            assert_eq!(
                m.seq,
                after + 1,
                "{} continues its cursor",
                m.conversation_id
            );
            held.push(m);
        }
        if !b.has_more {
            return got;
        }
        cursors = got
            .iter()
            .map(|(id, held)| pb::Cursor {
                conversation_id: id.clone(),
                after_seq: held.last().map_or(0, |m| m.seq),
            })
            .collect();
    }
    panic!("Sync never finished")
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_message_and_reuses_no_seq() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 750;
    const KILL_AFTER: usize = SENDERS * PER_SENDER / 3;
    let mut node = Node::start("durable-sigkill");
    let senders: Vec<String> = (0..SENDERS).map(|i| format!("sender{i}")).collect();
    let mut members: Vec<&str> = senders.iter().map(String::as_str).collect();
    members.push("reader");
    let group = node
        .login("reader", "setup")
        .create_group("everyone", &members, T)
        .unwrap()
        .conversation_id;
    let data = node.data.clone();
    let current = Arc::new(Current::default());
    current.set(1, Some(node.addr()));
    let acked = Arc::new(Acked::default());
    let threads: Vec<_> = senders
        .iter()
        .map(|sender| {
            // Even messages into the group, odd ones into the sender's
            // direct conversation with the reader.
            let dm = palaver_protocol::direct_conversation_id(sender, "reader");
            let out: Vec<Outgoing> = (0..PER_SENDER)
                .map(|n| Outgoing {
                    conversation_id: if n % 2 == 0 {
                        group.clone()
                    } else {
                        dm.clone()
                    },
                    client_msg_id: new_client_msg_id(),
                    body: format!("{sender} #{n}"),
                    ack: None,
                    sends: 0,
                })
                .collect();
            let (data, current, acked, sender) =
                (data.clone(), current.clone(), acked.clone(), sender.clone());
            std::thread::spawn(move || stream(&data, &current, &sender, "phone", out, 8, &acked))
        })
        .collect();

    // Mid-stream: once a third is acknowledged, SIGKILL, and a new process
    // on the same data dir.
    assert!(
        acked.wait_for(KILL_AFTER, Duration::from_secs(120)),
        "the stream stalled before the kill"
    );
    node.kill();
    let acked_at_kill = acked.get();
    assert!(
        acked_at_kill < SENDERS * PER_SENDER,
        "the kill came after the stream"
    );
    current.set(1, None);
    let restarted = Instant::now();
    node.restart();
    current.set(2, Some(node.addr()));
    let sent: Vec<Vec<Outgoing>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let took = restarted.elapsed();
    let resent = sent.iter().flatten().filter(|o| o.sends > 1).count();
    println!(
        "DURABLE-RESTART killed after {acked_at_kill} acks; {resent} resent after the \
         restart; every sender done {took:?} after it"
    );

    // Every message was acked, and its ack is what is stored.
    let mut reader = node.login("reader", "phone");
    let mut by_conversation: BTreeMap<String, Vec<&Outgoing>> = BTreeMap::new();
    for o in sent.iter().flatten() {
        assert!(o.ack.is_some(), "{} never acked", o.body);
        by_conversation
            .entry(o.conversation_id.clone())
            .or_default()
            .push(o);
    }
    let mut histories: BTreeMap<String, Vec<pb::Message>> = BTreeMap::new();
    for (conversation, outgoing) in &by_conversation {
        let stored = history(&mut reader, conversation, 500);
        let n = outgoing.len() as u64;
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{conversation}: one message per send, seqs 1..={n} (no gap, none reused)"
        );
        for o in outgoing {
            let ack = o.ack.as_ref().unwrap();
            let m = &stored[ack.seq as usize - 1];
            assert_eq!(
                (&m.message_id, m.body.as_slice(), &m.client_msg_id),
                (&ack.message_id, o.body.as_bytes(), &o.client_msg_id),
                "{conversation} seq {}: the acknowledged message",
                ack.seq
            );
        }
        // Each sender's messages in its send order.
        for sender in &senders {
            let mine: Vec<u64> = outgoing
                .iter()
                .filter(|o| o.body.starts_with(&format!("{sender} ")))
                .map(|o| o.ack.as_ref().unwrap().seq)
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{sender} in order");
        }
        histories.insert(conversation.clone(), stored);
    }
    // Sync from nothing hands out the same messages, every conversation.
    let synced = sync_everything(&mut reader, None);
    assert_eq!(synced, histories, "the reader's Sync");
    // A sender Syncing on reconnect (Hello with resume cursors at 0) gets
    // all of its direct conversation.
    let dm = palaver_protocol::direct_conversation_id(&senders[0], "reader");
    let mut resumed = login(
        &node.data,
        node.addr(),
        &senders[0],
        "tablet",
        vec![pb::Cursor {
            conversation_id: dm.clone(),
            after_seq: 0,
        }],
    );
    let f = resumed
        .recv_until(T, "SyncBatch", |f| {
            matches!(f.body, Some(Body::SyncBatch(_)))
        })
        .unwrap();
    let Some(Body::SyncBatch(first)) = f.body else {
        unreachable!()
    };
    let synced = sync_everything(&mut resumed, Some(first));
    assert_eq!(
        synced[&dm], histories[&dm],
        "resume from 0 syncs the whole DM"
    );
    assert_eq!(synced[&group], histories[&group], "and the group");
    // New messages go on after the last seq.
    let id = reader
        .request(send_body(&group, &new_client_msg_id(), "after all that"))
        .unwrap();
    let f = reader
        .recv_until(T, "SendAck", |f| f.request_id == id)
        .unwrap();
    let Some(Body::SendAck(ack)) = f.body else {
        panic!("{f:?}")
    };
    assert_eq!(ack.seq, by_conversation[&group].len() as u64 + 1);
}

#[test]
fn fifty_thousand_messages_survive_a_sigkill_and_page_back_to_seq_1() {
    const N: usize = 50_000;
    const DEVICES: usize = 4;
    let mut node = Node::start("durable-50k");
    let dm = palaver_protocol::direct_conversation_id("writer", "reader");
    let current = Arc::new(Current::default());
    current.set(1, Some(node.addr()));
    let acked = Arc::new(Acked::default());
    let started = Instant::now();
    // Four devices of one user write into one conversation, pipelined, so
    // the engine's turns (one commit each) hold many messages.
    let threads: Vec<_> = (0..DEVICES)
        .map(|d| {
            let out: Vec<Outgoing> = (0..N / DEVICES)
                .map(|n| Outgoing {
                    conversation_id: dm.clone(),
                    client_msg_id: new_client_msg_id(),
                    body: format!("device{d} #{n}"),
                    ack: None,
                    sends: 0,
                })
                .collect();
            let (data, current, acked) = (node.data.clone(), current.clone(), acked.clone());
            let device = format!("device{d}");
            std::thread::spawn(move || stream(&data, &current, "writer", &device, out, 32, &acked))
        })
        .collect();
    let sent: Vec<Outgoing> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    println!(
        "DURABLE-50K {N} messages sent and acked in {:?}",
        started.elapsed()
    );
    let mut by_seq: Vec<Option<&Outgoing>> = vec![None; N + 1];
    for o in &sent {
        let seq = o.ack.as_ref().unwrap().seq as usize;
        assert!(by_seq[seq].replace(o).is_none(), "seq {seq} acked twice");
    }
    assert!(by_seq[1..].iter().all(Option::is_some), "seqs 1..={N}");
    node.kill();
    node.restart();
    let mut reader = node.login("reader", "phone");
    let started = Instant::now();
    let stored = history(&mut reader, &dm, 500);
    println!(
        "DURABLE-50K History paged back to seq 1 after a SIGKILL and restart in {:?}",
        started.elapsed()
    );
    assert_eq!(stored.len(), N);
    for (n, m) in stored.iter().enumerate() {
        let o = by_seq[n + 1].unwrap();
        assert_eq!(m.seq, n as u64 + 1);
        assert_eq!(m.body, o.body.as_bytes());
        assert_eq!(m.message_id, o.ack.as_ref().unwrap().message_id);
    }
}

/// One durable store, one process: a second gateway on the same data dir
/// exits at start with an error naming the store file and what to do,
/// instead of serving from a store it cannot write.
#[test]
fn a_second_gateway_on_the_same_data_dir_exits_naming_the_store() {
    let node = Node::start("durable-in-use");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palaver-gateway"))
        .args(["--listen", "127.0.0.1:0", "--cores", "1", "--data-dir"])
        .arg(&node.data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let store = node.data.join("store").join("palaver.redb");
    assert!(stderr.contains(&store.display().to_string()), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    // The first one still serves.
    node.login("alice", "phone");
}
