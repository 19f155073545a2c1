//! Chat traffic for the fault tests, and the checks after it.
//!
//! `senders` conversations `dm(alice, peer<i>)`: sender `alice/dev<i>`
//! alternates between the two gateways, its peer sits on the other one and
//! drains deliveries. Each sender sends `per_sender` messages (bodies
//! "0", "1", ...) one at a time, as a real client does: it waits for the
//! SendAck; on `Error(UNAVAILABLE)`, silence or a lost connection it
//! retries the same client_msg_id, reconnecting (to the other gateway first)
//! when the connection is gone. Every frame's error code and GoAway is
//! recorded.
//!
//! [`Traffic::finish`] then checks what the fault tests promise: every
//! acknowledged message is in history exactly once, seqs are gapless and in
//! send order, a Sync after reconnect (Hello with resume cursors) returns
//! the same messages, and the clients saw only the codes SPEC promises for
//! outages (UNAVAILABLE; GoAway and closes are counted).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use palaver_credentials::auth;
use palaver_protocol::pb::{self, frame::Body};
use palaver_testkit::client::{new_client_msg_id, Client, ClientError, ConnectOptions};

use super::Stack;

/// How long one message may stay unacknowledged before the test fails
/// (a hang, not a slow recovery: recoveries take seconds).
const STUCK: Duration = Duration::from_secs(120);

/// Where and as whom to (re)connect.
#[derive(Clone)]
struct Login {
    gateways: Vec<ConnectOptions>,
    secret: Vec<u8>,
}

impl Login {
    /// Connects and says Hello, trying gateway `first` and then the others,
    /// until `deadline`. Returns the client and the gateway it reached.
    fn connect(
        &self,
        first: usize,
        user: &str,
        device: &str,
        resume: Vec<pb::Cursor>,
        log: &Log,
        deadline: Instant,
    ) -> (Client, pb::Welcome, usize) {
        let n = self.gateways.len();
        let mut attempt = 0;
        loop {
            let gw = (first + attempt) % n;
            attempt += 1;
            let hello = pb::Hello {
                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                token: auth::mint_hs256(&self.secret, user, None, 3600),
                device_id: device.into(),
                client_name: "fault".into(),
                client_version: "0".into(),
                resume: resume.clone(),
            };
            match Client::connect(&self.gateways[gw]) {
                Ok(mut c) => match c.hello_with(hello, Duration::from_secs(10)) {
                    Ok(w) => return (c, w, gw),
                    Err(e) => log.client_error(&e),
                },
                Err(e) => log.client_error(&e),
            }
            assert!(
                Instant::now() < deadline,
                "{user}/{device} could not reconnect to any gateway"
            );
            // A reconnecting client's back-off.
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What every client saw besides acks.
#[derive(Default)]
struct Log {
    codes: Mutex<BTreeMap<u32, usize>>,
    goaways: Mutex<BTreeMap<i32, usize>>,
    closes: AtomicUsize,
    reconnects: AtomicUsize,
}

impl Log {
    fn frame(&self, f: &pb::Frame) {
        match &f.body {
            Some(Body::Error(e)) => *self.codes.lock().unwrap().entry(e.code).or_default() += 1,
            Some(Body::GoAway(g)) => {
                *self.goaways.lock().unwrap().entry(g.reason).or_default() += 1
            }
            _ => {}
        }
    }

    fn client_error(&self, e: &ClientError) {
        match e {
            ClientError::GoAway(g) => {
                *self.goaways.lock().unwrap().entry(g.reason).or_default() += 1
            }
            ClientError::Timeout(_) => {}
            _ => {
                self.closes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One acknowledged message: its ack and when it arrived.
struct Acked {
    ack: pb::SendAck,
    at: Instant,
}

pub struct Traffic {
    login: Login,
    convs: Vec<String>,
    per_sender: usize,
    senders: Vec<JoinHandle<Vec<Acked>>>,
    peers: Vec<JoinHandle<()>>,
    stop_peers: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
    log: Arc<Log>,
    started: Instant,
}

/// What a finished run measured.
pub struct Outcome {
    pub acked: usize,
    /// From the fault to the moment every sender had an ack again.
    pub recovery: Duration,
    pub unavailable: usize,
    pub reconnects: usize,
}

impl Traffic {
    /// Starts `senders` senders of `per_sender` messages each, and their peers.
    pub fn start(stack: &Stack, senders: usize, per_sender: usize) -> Self {
        let login = Login {
            gateways: stack.gateway_addrs(),
            secret: stack.secret(),
        };
        let log = Arc::new(Log::default());
        let progress = Arc::new(AtomicUsize::new(0));
        let stop_peers = Arc::new(AtomicBool::new(false));
        let n = login.gateways.len();
        let convs: Vec<String> = (0..senders)
            .map(|i| palaver_protocol::direct_conversation_id("alice", &format!("peer{i}")))
            .collect();
        let mut peer_threads = Vec::new();
        for i in 0..senders {
            let (login, log, stop) = (login.clone(), log.clone(), stop_peers.clone());
            let peer = format!("peer{i}");
            let gw = (i + 1) % n;
            // Connected before the senders start, so deliveries cross gateways.
            let (c, _, _) = login.connect(gw, &peer, "phone", Vec::new(), &log, deadline());
            peer_threads.push(thread::spawn(move || {
                drain(c, login, gw, &peer, &log, &stop)
            }));
        }
        let mut sender_threads = Vec::new();
        for (i, conv) in convs.iter().enumerate() {
            let (login, log, progress) = (login.clone(), log.clone(), progress.clone());
            let conv = conv.clone();
            sender_threads.push(thread::spawn(move || {
                send_all(
                    &login,
                    i % n,
                    &format!("dev{i}"),
                    &conv,
                    per_sender,
                    &log,
                    &progress,
                )
            }));
        }
        Self {
            login,
            convs,
            per_sender,
            senders: sender_threads,
            peers: peer_threads,
            stop_peers,
            progress,
            log,
            started: Instant::now(),
        }
    }

    pub fn total(&self) -> usize {
        self.convs.len() * self.per_sender
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        self.progress.load(Ordering::Relaxed)
    }

    /// Waits until `n` messages are acknowledged (traffic flows).
    pub fn wait_acked(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} messages acknowledged before the fault",
                self.acked()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until some client got `Error(UNAVAILABLE)`.
    pub fn wait_unavailable(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.unavailable() == 0 {
            assert!(
                Instant::now() < deadline,
                "no client was answered UNAVAILABLE during the outage"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn unavailable(&self) -> usize {
        self.log
            .codes
            .lock()
            .unwrap()
            .get(&(pb::ErrorCode::Unavailable as u32))
            .copied()
            .unwrap_or(0)
    }

    /// Waits for every sender to finish, then checks history, Sync and the
    /// codes clients saw. `fault_at`: when the fault was injected.
    pub fn finish(mut self, name: &str, fault_at: Instant) -> Outcome {
        let acked_at_fault_is_partial = self.acked() < self.total();
        let mut acked: Vec<Vec<Acked>> = Vec::new();
        for h in std::mem::take(&mut self.senders) {
            acked.push(h.join().expect("a sender failed"));
        }
        let finished = Instant::now();
        self.stop_peers.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.peers) {
            h.join().expect("a peer failed");
        }

        // Recovery: every sender had an ack after the fault.
        let recovery = acked
            .iter()
            .filter_map(|acks| acks.iter().find(|a| a.at > fault_at))
            .map(|a| a.at - fault_at)
            .max()
            .unwrap_or_default();

        // History: exactly the acknowledged messages, gapless, in send order.
        let (mut reader, _, _) =
            self.login
                .connect(0, "alice", "reader", Vec::new(), &self.log, deadline());
        for (conv, acks) in self.convs.iter().zip(&acked) {
            assert_eq!(
                acks.len(),
                self.per_sender,
                "{conv}: every send acknowledged"
            );
            let page = history(&mut reader, conv, &self.log);
            let seqs: Vec<u64> = page.iter().map(|m| m.seq).collect();
            assert_eq!(
                seqs,
                (1..=self.per_sender as u64).collect::<Vec<_>>(),
                "{conv}: one stored message per acknowledged send, seqs gapless"
            );
            for (n, (m, a)) in page.iter().zip(acks).enumerate() {
                assert_eq!(
                    (m.seq, &m.message_id, m.body.as_slice()),
                    (a.ack.seq, &a.ack.message_id, n.to_string().as_bytes()),
                    "{conv}: message {n} stored as acknowledged, in send order"
                );
            }
        }

        // Sync after reconnect: Hello with cursors at 0 returns the same.
        let cursors: Vec<pb::Cursor> = self
            .convs
            .iter()
            .map(|c| pb::Cursor {
                conversation_id: c.clone(),
                after_seq: 0,
            })
            .collect();
        let (mut syncer, _, _) =
            self.login
                .connect(1, "alice", "syncer", cursors, &self.log, deadline());
        let synced = sync_all(&mut syncer, &self.convs, &self.log);
        for (conv, acks) in self.convs.iter().zip(&acked) {
            let got: Vec<(u64, String)> = synced
                .get(conv)
                .map(|ms| ms.iter().map(|m| (m.seq, m.message_id.clone())).collect())
                .unwrap_or_default();
            let want: Vec<(u64, String)> = acks
                .iter()
                .map(|a| (a.ack.seq, a.ack.message_id.clone()))
                .collect();
            assert_eq!(got, want, "{conv}: Sync returns every acknowledged message");
        }

        // Only the codes SPEC promises for an outage.
        let codes = self.log.codes.lock().unwrap().clone();
        let goaways = self.log.goaways.lock().unwrap().clone();
        for code in codes.keys() {
            assert_eq!(
                *code,
                pb::ErrorCode::Unavailable as u32,
                "clients saw error code {code} (all codes: {codes:?})"
            );
        }
        let outcome = Outcome {
            acked: acked.iter().map(Vec::len).sum(),
            recovery,
            unavailable: self.unavailable(),
            reconnects: self.log.reconnects.load(Ordering::Relaxed),
        };
        eprintln!(
            "FAULT {name}: {} messages acknowledged, all in history once, gapless, ordered, \
             and in Sync; recovery {:.2} s after the fault; traffic {:.1} s; \
             UNAVAILABLE {}, GoAway {goaways:?}, closes {}, reconnects {}; mid-stream: {}",
            outcome.acked,
            recovery.as_secs_f64(),
            (finished - self.started).as_secs_f64(),
            outcome.unavailable,
            self.log.closes.load(Ordering::Relaxed),
            outcome.reconnects,
            acked_at_fault_is_partial,
        );
        assert!(
            acked_at_fault_is_partial,
            "the fault came after the stream ended"
        );
        outcome
    }
}

fn deadline() -> Instant {
    Instant::now() + STUCK
}

/// One sender's stream; returns its acks in send order.
fn send_all(
    login: &Login,
    gw: usize,
    device: &str,
    conv: &str,
    n: usize,
    log: &Log,
    progress: &AtomicUsize,
) -> Vec<Acked> {
    let (mut client, _, mut gw) = login.connect(gw, "alice", device, Vec::new(), log, deadline());
    let mut acks = Vec::new();
    for i in 0..n {
        let cmid = new_client_msg_id();
        let stuck = deadline();
        let send = Body::Send(pb::Send {
            conversation_id: conv.into(),
            client_msg_id: cmid.clone(),
            kind: pb::ContentKind::Text as i32,
            body: i.to_string().into_bytes(),
            ..Default::default()
        });
        // What the attempts got, for the report if the message is stuck.
        let (mut attempts, mut last) = (0, String::from("nothing"));
        let ack = loop {
            assert!(
                Instant::now() < stuck,
                "{device}: message {i} of {conv} unacknowledged for {STUCK:?} \
                 ({attempts} attempts, the last answered {last})"
            );
            attempts += 1;
            let answer = client.request(send.clone()).and_then(|id| {
                client.recv_until(Duration::from_secs(10), "SendAck", |f| {
                    log.frame(f);
                    f.request_id == id
                        || matches!(f.body, Some(Body::GoAway(_)))
                        || (f.request_id == 0 && matches!(f.body, Some(Body::Error(_))))
                })
            });
            match answer {
                Ok(f) => match f.body {
                    Some(Body::SendAck(a)) => break a,
                    Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                        if f.request_id != 0 {
                            assert_eq!(e.client_msg_id, cmid, "UNAVAILABLE names the Send");
                        }
                        last = format!("UNAVAILABLE: {}", e.message);
                        // A client's retry back-off.
                        thread::sleep(Duration::from_millis(200));
                    }
                    Some(Body::Error(e)) if f.request_id != 0 => {
                        panic!("{device}: Send answered {e:?}")
                    }
                    // GoAway or a connection-level error: the server closes.
                    other => {
                        last = format!("{other:?}");
                        (client, _, gw) = reconnect(login, gw, device, log);
                    }
                },
                // Silence: send again with the same client_msg_id.
                Err(ClientError::Timeout(_)) => last = "silence (10 s)".into(),
                Err(e) => {
                    last = format!("{e}");
                    log.client_error(&e);
                    (client, _, gw) = reconnect(login, gw, device, log);
                }
            }
        };
        acks.push(Acked {
            ack,
            at: Instant::now(),
        });
        progress.fetch_add(1, Ordering::Relaxed);
    }
    acks
}

fn reconnect(login: &Login, gw: usize, device: &str, log: &Log) -> (Client, pb::Welcome, usize) {
    log.reconnects.fetch_add(1, Ordering::Relaxed);
    let other = (gw + 1) % login.gateways.len();
    login.connect(other, "alice", device, Vec::new(), log, deadline())
}

/// A peer reads (and drops) its deliveries until `stop`, reconnecting when
/// its gateway goes away.
fn drain(mut c: Client, login: Login, mut gw: usize, user: &str, log: &Log, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match c.recv(Duration::from_millis(100)) {
            Ok(Some(f)) => log.frame(&f),
            Ok(None) => {}
            Err(e) => {
                log.client_error(&e);
                log.reconnects.fetch_add(1, Ordering::Relaxed);
                let other = (gw + 1) % login.gateways.len();
                (c, _, gw) = login.connect(other, user, "phone", Vec::new(), log, deadline());
            }
        }
    }
}

/// The conversation's whole history, oldest first.
fn history(c: &mut Client, conv: &str, log: &Log) -> Vec<pb::Message> {
    let mut all: Vec<pb::Message> = Vec::new();
    let mut before = 0;
    loop {
        let id = c
            .request(Body::History(pb::History {
                conversation_id: conv.into(),
                before_seq: before,
                limit: 200,
            }))
            .expect("History");
        let f = c
            .recv_until(super::T, "HistoryPage", |f| f.request_id == id)
            .expect("HistoryPage");
        let page = match f.body {
            Some(Body::HistoryPage(page)) => page,
            // A read on a connection the store lost: the client retries.
            Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                log.frame(&pb::Frame {
                    request_id: id,
                    body: Some(Body::Error(e)),
                });
                thread::sleep(Duration::from_millis(200));
                continue;
            }
            other => panic!("History answered {other:?}"),
        };
        if page.messages.is_empty() {
            break;
        }
        let mut page = page.messages;
        page.sort_by_key(|m| m.seq);
        before = page[0].seq;
        page.append(&mut all);
        all = page;
        if before <= 1 {
            break;
        }
    }
    all
}

/// Reads the SyncBatch a resuming Hello triggers, then Syncs on until
/// `has_more` is false; messages by conversation, ascending.
fn sync_all(c: &mut Client, convs: &[String], log: &Log) -> BTreeMap<String, Vec<pb::Message>> {
    let mut got: BTreeMap<String, Vec<pb::Message>> = BTreeMap::new();
    let mut f = c
        .recv_until(super::T, "SyncBatch", |f| {
            // The Hello's own Sync answers with the Hello's request id.
            matches!(f.body, Some(Body::SyncBatch(_)) | Some(Body::Error(_)))
        })
        .expect("SyncBatch after a resuming Hello");
    loop {
        let more = match f.body {
            Some(Body::SyncBatch(batch)) => {
                for m in batch.messages {
                    got.entry(m.conversation_id.clone()).or_default().push(m);
                }
                batch.has_more
            }
            // A read on a connection the store lost: the client retries.
            Some(Body::Error(e)) if e.code == pb::ErrorCode::Unavailable as u32 => {
                log.frame(&pb::Frame {
                    request_id: f.request_id,
                    body: Some(Body::Error(e)),
                });
                thread::sleep(Duration::from_millis(200));
                true
            }
            other => panic!("Sync answered {other:?}"),
        };
        if !more {
            return got;
        }
        let cursors = convs
            .iter()
            .map(|conv| pb::Cursor {
                conversation_id: conv.clone(),
                after_seq: got.get(conv).and_then(|ms| ms.last()).map_or(0, |m| m.seq),
            })
            .collect();
        let id = c
            .request(Body::Sync(pb::Sync { cursors, limit: 0 }))
            .expect("Sync");
        f = c
            .recv_until(super::T, "SyncBatch", |f| f.request_id == id)
            .expect("SyncBatch");
    }
}
