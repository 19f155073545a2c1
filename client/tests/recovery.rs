//! The SDK when things go wrong, against real in-process gateways: a
//! memory-only server restarted under traffic (a new history epoch, SPEC
//! §7), a certificate the app does not trust, an unreachable server, and a
//! listener that throws (reported to the log sink).
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::*;
use palaver_client::{
    memory_store, set_log_sink, ChatMessage, ClientEvent, ConnectFailure, ConnectionState,
    DisconnectCause, EventListener, ListenerError, LogLevel, LogSink, PalaverClient,
};

#[test]
fn a_memory_only_server_restarted_under_traffic_starts_a_new_epoch_and_nothing_it_stores_is_lost() {
    // The server forgets everything when it stops (`--ephemeral`): seqs
    // start again at 1 while the clients' cursors are far ahead. Before
    // history epochs the receiver dropped every new message as a repeat.
    let mut stack =
        Stack::start(|c| c.backend = palaver_gateway::config::BackendConfig::ephemeral());
    let (alice, ra) = stack.login("alice", "phone");
    // bob keeps his cursors in a store that outlives his client: later he
    // resumes from cursors saved in the new epoch.
    let bob_store = memory_store();
    let rb = Recorder::new();
    let bob = PalaverClient::new(
        stack.config("phone"),
        stack.tokens("bob"),
        rb.clone(),
        Some(bob_store.clone()),
    )
    .unwrap();
    bob.connect().unwrap();
    rb.wait_connected(1);
    let conv = dm("alice", "bob");

    let first = send_numbered(&alice, &conv, "a", 300);
    rb.wait_messages(&conv, 300);
    ra.wait_acked(300);
    // Under traffic: the restart lands while the next 300 are on their way.
    let during = send_tracked(&alice, &conv, "b", 300);
    rb.wait("some of the next messages", T, |e| {
        messages_in(e, &conv) >= first.len() + 10
    });
    let links_lost = |r: &Recorder| {
        r.snapshot()
            .iter()
            .filter(|(_, e)| is_connecting(e))
            .count()
    };
    let (lost_a, lost_b) = (links_lost(&ra), links_lost(&rb));
    stack.stop_all();
    // Events reach the app in order on one thread: once each app heard the
    // link go, it has heard every ack and message of the old server.
    ra.wait("alice loses the link", T, |e| {
        e.iter().filter(|e| is_connecting(e)).count() > lost_a
    });
    rb.wait("bob loses the link", T, |e| {
        e.iter().filter(|e| is_connecting(e)).count() > lost_b
    });
    let acked_by_old: HashSet<Vec<u8>> = acked_ids(&ra);
    let got_from_old: HashSet<String> = rb.messages().iter().map(|m| m.text()).collect();
    stack.start_again();
    let after = send_tracked(&alice, &conv, "c", 300);

    // What the new server stores: the part of `during` the old one never
    // acknowledged (the outbox resends it) and all of `after`. Every one of
    // those reaches bob exactly once, in order.
    let stored_by_new: Vec<String> = during
        .iter()
        .chain(&after)
        .filter(|(_, id)| !acked_by_old.contains(id))
        .map(|(t, _)| t.clone())
        .collect();
    // Acknowledged by the old server but not yet received by bob when it
    // stopped: gone with its memory (SPEC §7, a memory-only server
    // forgets). Counted, not expected.
    let forgotten = during
        .iter()
        .filter(|(t, id)| acked_by_old.contains(id) && !got_from_old.contains(t))
        .count();
    rb.wait("every message the new server stores", T * 3, |e| {
        let got: HashSet<String> = e
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Message { message } => Some(message.text()),
                _ => None,
            })
            .collect();
        stored_by_new.iter().all(|t| got.contains(t))
    });
    let wanted: HashSet<&String> = stored_by_new.iter().collect();
    let got_new: Vec<ChatMessage> = rb
        .messages()
        .into_iter()
        .filter(|m| wanted.contains(&m.text()))
        .collect();
    println!(
        "restart: {} messages stored by the new server, {forgotten} acknowledged by the old one \
         and forgotten with it",
        stored_by_new.len()
    );
    assert_exactly_once_in_order("after the restart", &got_new, &stored_by_new);
    assert!(
        got_new.iter().any(|m| m.seq <= 300),
        "the new history reuses seqs below the old cursor (else this test shows nothing)"
    );
    for (who, r) in [("alice", &ra), ("bob", &rb)] {
        assert!(
            r.snapshot().iter().any(|(_, e)| matches!(
                e,
                ClientEvent::HistoryReset { conversation_id } if *conversation_id == conv
            )),
            "{who}'s app is told"
        );
    }

    // Restarted from cursors saved in the new epoch, bob resumes without a
    // reset and without repeats.
    bob.shutdown();
    let rb2 = Recorder::new();
    let bob2 = PalaverClient::new(
        stack.config("phone"),
        stack.tokens("bob"),
        rb2.clone(),
        Some(bob_store),
    )
    .unwrap();
    bob2.connect().unwrap();
    let last = send_numbered(&alice, &conv, "d", 10);
    rb2.wait("the last 10", T, |e| messages_in(e, &conv) >= 10);
    let got_last: Vec<ChatMessage> = rb2
        .messages()
        .into_iter()
        .filter(|m| m.text().starts_with('d'))
        .collect();
    assert_exactly_once_in_order("resumed from saved cursors", &got_last, &last);
    assert_eq!(
        rb2.messages().len(),
        10,
        "nothing before them came again: {:?}",
        rb2.messages().iter().map(|m| m.text()).collect::<Vec<_>>()
    );
    assert!(!rb2
        .snapshot()
        .iter()
        .any(|(_, e)| matches!(e, ClientEvent::HistoryReset { .. })));
    bob2.shutdown();
    alice.shutdown();
}

/// Like `send_numbered`, with each message's client_msg_id.
fn send_tracked(
    sender: &PalaverClient,
    conv: &str,
    prefix: &str,
    n: usize,
) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let t = format!("{prefix}{i:05}");
            let id = sender.send_text(conv.to_string(), t.clone()).unwrap();
            (t, id)
        })
        .collect()
}

/// The client_msg_ids of every MessageSent the recorder has seen.
fn acked_ids(r: &Recorder) -> HashSet<Vec<u8>> {
    r.snapshot()
        .into_iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::MessageSent { client_msg_id, .. } => Some(client_msg_id),
            _ => None,
        })
        .collect()
}

/// Log lines the SDK hands the app's sink (process-wide: filter by text).
struct Lines(Mutex<Vec<(LogLevel, String)>>);

impl LogSink for Lines {
    fn log(&self, level: LogLevel, message: String) {
        self.0.lock().unwrap().push((level, message));
    }
}

fn log_lines() -> Arc<Lines> {
    static LINES: std::sync::OnceLock<Arc<Lines>> = std::sync::OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Arc::new(Lines(Mutex::new(Vec::new())));
            set_log_sink(lines.clone());
            lines
        })
        .clone()
}

#[test]
fn a_server_with_a_certificate_the_app_does_not_trust_stops_reconnecting_and_says_why() {
    let lines = log_lines();
    let stack = Stack::start(|_| {});
    let other = Stack::start(|_| {}); // another CA
    let mut config = stack.config("phone");
    config.trusted_ca_pem = other.ca_pem.clone();
    let (c, r) = stack.client(config, "alice");
    c.connect().unwrap();
    r.wait("a stop with a reason", T, |e| {
        e.iter().any(|e| {
            matches!(
                e,
                ClientEvent::StateChanged {
                    state: ConnectionState::Disconnected {
                        cause: Some(DisconnectCause::Failed {
                            failure: ConnectFailure::UntrustedCertificate { .. }
                        })
                    }
                }
            )
        })
    });
    let attempts = r
        .snapshot()
        .iter()
        .filter(|(_, e)| is_connecting(e))
        .count();
    assert_eq!(attempts, 1, "one attempt, no retry loop");
    assert!(lines
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|(level, line)| *level == LogLevel::Warn && line.contains("UntrustedCertificate")));
    c.shutdown();
}

#[test]
fn an_unreachable_server_shows_as_connecting_with_the_reason() {
    // A port with nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stack = Stack::start(|_| {});
    let (c, r) = stack.client(stack.config_at(port, "phone"), "alice");
    c.connect().unwrap();
    r.wait("a retry that says why", T, |e| {
        e.iter().any(|e| {
            matches!(
                e,
                ClientEvent::StateChanged {
                    state: ConnectionState::Connecting {
                        last_failure: Some(ConnectFailure::Unreachable { .. }),
                        ..
                    }
                }
            )
        })
    });
    c.shutdown();
}

/// A listener that fails on every message (what a Kotlin or Swift
/// exception becomes across UniFFI) and records everything else.
struct Failing(Arc<Recorder>);

impl EventListener for Failing {
    fn on_event(&self, event: ClientEvent) -> Result<(), ListenerError> {
        let failed = matches!(event, ClientEvent::Message { .. });
        self.0.on_event(event)?;
        if failed {
            return Err(ListenerError::Failed {
                detail: "app bug: boom".into(),
            });
        }
        Ok(())
    }
}

#[test]
fn a_listener_that_throws_is_reported_to_the_log_sink_and_later_events_still_come() {
    let lines = log_lines();
    let stack = Stack::start(|_| {});
    let (alice, ra) = stack.login("alice", "phone");
    let rb = Recorder::new();
    let bob = PalaverClient::new(
        stack.config("phone"),
        stack.tokens("bob"),
        Arc::new(Failing(rb.clone())),
        None,
    )
    .unwrap();
    bob.connect().unwrap();
    rb.wait_connected(1);
    let conv = dm("alice", "bob");
    let sent = send_numbered(&alice, &conv, "x", 5);
    let got = rb.wait_messages(&conv, 5);
    assert_exactly_once_in_order("throwing listener", &got, &sent);
    ra.wait_acked(5);
    // Events are handed over in order on one thread: once an event that
    // comes after the last message reached bob's listener, every failure
    // before it was reported.
    let syncs = |e: &[ClientEvent]| {
        e.iter()
            .filter(|e| matches!(e, ClientEvent::SyncComplete))
            .count()
    };
    let before = syncs(
        &rb.snapshot()
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>(),
    );
    bob.sync_now().unwrap();
    rb.wait("a sync after the messages", T, |e| syncs(e) > before);
    let reported = lines
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(level, line)| *level == LogLevel::Error && line.contains("app bug: boom"))
        .count();
    assert!(reported >= 5, "{reported} lines");
    bob.shutdown();
    alice.shutdown();
}
