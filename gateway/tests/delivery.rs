//! The backend → connection path with a recording backend: frames reach the
//! addressed connection, frames for a closed connection whose slot has been
//! reused are dropped (generation check), closing frames close; the backend
//! sees one identity per session, from Hello to close.
// A test or an example: a failed unwrap is a failed run (the
// workspace's unwrap_used floor is for the product's code).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use palaver_gateway::{Config, GatewayHandle};
use palaver_protocol::pb::{self, frame::Body};
use palaver_router::api::{Backend, BackendError, DeliverySink, Inbound, Outbound, Session};
use palaver_testkit::client::{Client, ConnectOptions};

#[derive(Default)]
struct Recording {
    sink: Mutex<Option<Arc<dyn DeliverySink>>>,
    opened: Mutex<Vec<Session>>,
    closed: Mutex<Vec<Session>>,
    submitted: Mutex<Vec<Inbound>>,
}

impl Backend for Recording {
    fn start(&self, _: &str, sink: Arc<dyn DeliverySink>) -> Result<(), BackendError> {
        *self.sink.lock().unwrap() = Some(sink);
        Ok(())
    }
    fn session_opened(&self, s: &Session) {
        self.opened.lock().unwrap().push(s.clone());
    }
    fn session_closed(&self, s: &Session, _: i64) {
        self.closed.lock().unwrap().push(s.clone());
    }
    fn submit(&self, request: Inbound) {
        self.submitted.lock().unwrap().push(request);
    }
    fn shutdown(&self) {}
}

impl Recording {
    fn send(&self, conn: u64, body: Body) {
        let sink = self.sink.lock().unwrap().clone().unwrap();
        sink.deliver(vec![Outbound {
            conn,
            frame: pb::Frame {
                request_id: 0,
                body: Some(body),
            },
            answers_request: false,
        }]);
    }
}

/// A one-core gateway in front of a recording backend: the handle, the
/// backend, the CA to trust, the JWT secret to mint tokens with and the
/// data directory to remove at the end.
fn start_recording(
    name: &str,
    gateway_id: String,
) -> (
    GatewayHandle,
    Arc<Recording>,
    Vec<u8>,
    Vec<u8>,
    std::path::PathBuf,
) {
    let dir = temp_dir(name);
    let backend = Arc::new(Recording::default());
    let config = Config {
        gateway_id,
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        data_dir: dir.clone(),
        ..Default::default()
    };
    let gw = GatewayHandle::start(config, backend.clone()).unwrap();
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let secret = palaver_gateway::devcerts::read_secret(
        &dir.join(palaver_gateway::devcerts::JWT_SECRET_FILE),
    )
    .unwrap();
    (gw, backend, ca, secret, dir)
}

fn typing(user: &str) -> Body {
    Body::Typing(pb::Typing {
        conversation_id: "dm:a:b".into(),
        active: true,
        user_id: user.into(),
    })
}

#[test]
fn stale_keys_are_dropped_and_closing_frames_close() {
    let (gw, backend, ca, secret, dir) = start_recording("delivery", Config::default().gateway_id);
    let login = |user: &str| {
        let mut c = Client::connect(&ConnectOptions::new(gw.local_addr, ca.clone())).unwrap();
        let token = palaver_gateway::auth::mint_hs256(&secret, user, None, 60);
        c.hello(&token, "phone", T).unwrap();
        c
    };

    let first = login("alice");
    let old_key = backend.opened.lock().unwrap()[0].addr.conn;
    drop(first);
    wait_until(T, "session_closed", || {
        backend.closed.lock().unwrap().len() == 1
    });
    assert_eq!(backend.closed.lock().unwrap()[0].addr.conn, old_key);

    // The next connection reuses the slot with a new generation.
    let mut second = login("bob");
    let new_key = backend.opened.lock().unwrap()[1].addr.conn;
    assert_ne!(new_key, old_key);
    assert_eq!(new_key >> 32, old_key >> 32, "same core and slot");

    backend.send(old_key, typing("for-alice"));
    backend.send(new_key, typing("for-bob"));
    let f = second.recv_timeout(T, "Typing").unwrap();
    assert!(
        matches!(f.body, Some(Body::Typing(ref t)) if t.user_id == "for-bob"),
        "{f:?}"
    );
    let stale: u64 = gw
        .core_metrics()
        .iter()
        .map(|m| {
            m.stale_deliveries
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(stale, 1);

    // A 1xxx Error from the backend is delivered, then the connection closes.
    backend.send(
        new_key,
        Body::Error(pb::Error {
            code: 1005,
            message: "from backend".into(),
            client_msg_id: vec![],
        }),
    );
    expect_error_and_close(&mut second, 1005);
    wait_until(T, "second session_closed", || {
        backend.closed.lock().unwrap().len() == 2
    });
    gw.stop();
    gw.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_backend_sees_one_identity_per_session() {
    // The gateway keeps only a session's ids and rebuilds the `Session` for
    // each request and at close: each must be the one Hello opened.
    let (gw, backend, ca, secret, dir) = start_recording("identity", "gw-identity".into());
    let mut c = Client::connect(&ConnectOptions::new(gw.local_addr, ca)).unwrap();
    let token = palaver_gateway::auth::mint_hs256(&secret, "alice.b@example-1", None, 60);
    c.hello_with(
        pb::Hello {
            protocol_version: palaver_protocol::PROTOCOL_VERSION,
            token,
            device_id: "tablet-7".into(),
            client_name: "test".into(),
            client_version: "0".into(),
            // Resuming sends a Sync on the client's behalf, built at Hello.
            resume: vec![pb::Cursor {
                conversation_id: "dm:a:b".into(),
                after_seq: 3,
            }],
        },
        T,
    )
    .unwrap();
    c.request(Body::History(pb::History {
        conversation_id: "dm:a:b".into(),
        ..Default::default()
    }))
    .unwrap();
    wait_until(T, "Sync and History submitted", || {
        backend.submitted.lock().unwrap().len() == 2
    });
    drop(c);
    wait_until(T, "session_closed", || {
        backend.closed.lock().unwrap().len() == 1
    });

    let opened = backend.opened.lock().unwrap().clone();
    assert_eq!(opened.len(), 1);
    let session = &opened[0];
    assert_eq!(session.user_id, "alice.b@example-1");
    assert_eq!(session.device_id, "tablet-7");
    assert_eq!(&*session.addr.gateway_id, "gw-identity");
    let submitted = backend.submitted.lock().unwrap();
    assert!(matches!(submitted[0].body, Body::Sync(_)), "{submitted:?}");
    assert!(
        matches!(submitted[1].body, Body::History(_)),
        "{submitted:?}"
    );
    for request in submitted.iter() {
        assert_eq!(&request.from, session);
    }
    assert_eq!(&backend.closed.lock().unwrap()[0], session);
    gw.stop();
    gw.join();
    let _ = std::fs::remove_dir_all(&dir);
}
