//! The Palaver side: two users' connections (Hello with a dev token each),
//! a 1:1 text Send from A, B's Deliver read, A's SendAck read afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use palaver_protocol::pb::{self, frame::Body};
use palaver_protocol::{encode_frame, frame, FrameDecoder};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::Hop;

struct Conn {
    tls: StreamOwned<ClientConnection, TcpStream>,
    decoder: FrameDecoder,
    inbox: std::collections::VecDeque<pb::Frame>,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(addr: &str, config: &Arc<ClientConfig>, token: &str, device: &str) -> Conn {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).unwrap();
        let mut config = (**config).clone();
        config.alpn_protocols = vec![palaver_protocol::ALPN.to_vec()];
        let name = ServerName::try_from("localhost").unwrap();
        let tls = StreamOwned::new(ClientConnection::new(Arc::new(config), name).unwrap(), sock);
        let mut c = Conn {
            tls,
            decoder: FrameDecoder::new(16 << 20),
            inbox: Default::default(),
            buf: vec![0; 16 << 10],
        };
        c.write(&frame(
            1,
            Body::Hello(pb::Hello {
                protocol_version: palaver_protocol::PROTOCOL_VERSION,
                token: token.into(),
                device_id: device.into(),
                client_name: "one-hop".into(),
                client_version: "1".into(),
                resume: Vec::new(),
            }),
        ));
        match c.read().body {
            Some(Body::Welcome(_)) => c,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    fn write(&mut self, f: &pb::Frame) {
        let mut out = Vec::with_capacity(128);
        encode_frame(f, &mut out);
        self.tls.write_all(&out).unwrap();
    }

    fn read(&mut self) -> pb::Frame {
        loop {
            if let Some(f) = self.inbox.pop_front() {
                return f;
            }
            let n = self.tls.read(&mut self.buf).expect("read");
            assert!(n > 0, "the gateway closed the connection");
            let inbox = &mut self.inbox;
            self.decoder
                .decode(&self.buf[..n], |f| inbox.push_back(f))
                .expect("frames");
        }
    }
}

pub struct Palaver {
    a: Conn,
    b: Conn,
    conversation: String,
    request_id: u32,
}

impl Palaver {
    /// `args`: TOKEN_A TOKEN_B USER_A USER_B.
    pub fn connect(addr: &str, config: &Arc<ClientConfig>, args: &[String]) -> Palaver {
        let [token_a, token_b, user_a, user_b] = args else {
            panic!("palaver needs TOKEN_A TOKEN_B USER_A USER_B");
        };
        Palaver {
            a: Conn::connect(addr, config, token_a, "hop-a"),
            b: Conn::connect(addr, config, token_b, "hop-b"),
            conversation: palaver_protocol::direct_conversation_id(user_a, user_b),
            request_id: 1,
        }
    }
}

impl Hop for Palaver {
    fn send(&mut self) {
        self.request_id += 1;
        let mut client_msg_id = [0u8; 16];
        client_msg_id[..4].copy_from_slice(&self.request_id.to_le_bytes());
        let send = frame(
            self.request_id,
            Body::Send(pb::Send {
                conversation_id: self.conversation.clone(),
                client_msg_id: client_msg_id.to_vec(),
                kind: pb::ContentKind::Text as i32,
                body: vec![0x5a; 32],
                reply_to_seq: 0,
                media: None,
            }),
        );
        self.a.write(&send);
    }

    fn receive(&mut self) {
        match self.b.read().body {
            Some(Body::Deliver(_)) => {}
            other => panic!("expected Deliver, got {other:?}"),
        }
    }

    fn after(&mut self) {
        match self.a.read().body {
            Some(Body::SendAck(_)) => {}
            other => panic!("expected SendAck, got {other:?}"),
        }
    }
}
