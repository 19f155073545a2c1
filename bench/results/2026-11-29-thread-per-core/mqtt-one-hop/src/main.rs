//! One-hop latency through an MQTT broker over TLS 1.3, measured the way
//! palaver-bench's `one-hop` scenario measures the gateway: two client
//! connections (a publisher and a subscriber) in one thread, one QoS 0
//! PUBLISH in flight at a time, latency from just before the PUBLISH is
//! encrypted and written to the moment the subscriber has read and
//! decrypted it; the next message goes at the pace (`rate`/s) or at once if
//! delivery took longer. 32-byte payloads.
//!
//!   mqtt-one-hop ADDR CA_PEM RATE SECONDS [SERVER_PID] [palaver TOKEN_A TOKEN_B USER_A USER_B]
//!
//! With `palaver ...` the same client loop runs against a Palaver gateway
//! instead (added 2026-11-29, `../2026-11-29-path-allocs/`): user A's
//! connection sends a 32-byte text Send to the 1:1 conversation with B,
//! latency ends when B's connection has read and decrypted the Deliver; A's
//! SendAck is read after the sample is taken (MQTT QoS 0 has none). The
//! same blocking client for both servers, so a difference is the server's.
//!
//! Prints the sample count and p50/p90/p99/p99.9/max in microseconds, and
//! with SERVER_PID the server's CPU (utime+stime) per message.

mod palaver;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

/// Reads one MQTT packet: (first byte, body).
fn read_packet(s: &mut Tls) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).expect("read");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read");
        len |= ((b[0] & 0x7f) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("read");
    (first[0], body)
}

fn connect(addr: &str, config: &Arc<ClientConfig>, client_id: &str) -> Tls {
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = StreamOwned::new(ClientConnection::new(config.clone(), name).unwrap(), sock);
    // MQTT 3.1.1 CONNECT, clean session, keepalive 60 s.
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    string(client_id.as_bytes(), &mut body);
    s.write_all(&packet(0x10, &body)).unwrap();
    let (kind, ack) = read_packet(&mut s);
    assert_eq!((kind, ack.as_slice()), (0x20, &[0u8, 0][..]), "CONNACK");
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    s
}

fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?)
}

/// One message through the server and back to the measuring thread.
trait Hop {
    /// Writes the message (the clock has started).
    fn send(&mut self);
    /// Reads until the recipient has the message.
    fn receive(&mut self);
    /// Whatever else the send produced, read after the sample.
    fn after(&mut self) {}
}

struct Mqtt {
    publisher: Tls,
    subscriber: Tls,
    publish: Vec<u8>,
}

impl Mqtt {
    fn connect(addr: &str, config: &Arc<ClientConfig>) -> Mqtt {
        let publisher = connect(addr, config, "hop-pub");
        let mut subscriber = connect(addr, config, "hop-sub");
        // SUBSCRIBE packet id 1, "hop/b" at QoS 0.
        let mut body = vec![0, 1];
        string(b"hop/b", &mut body);
        body.push(0);
        subscriber.write_all(&packet(0x82, &body)).unwrap();
        let (kind, _) = read_packet(&mut subscriber);
        assert_eq!(kind, 0x90, "SUBACK");
        let mut publish = Vec::new();
        string(b"hop/b", &mut publish);
        publish.extend_from_slice(&[0x5a; 32]);
        Mqtt {
            publisher,
            subscriber,
            publish: packet(0x30, &publish),
        }
    }
}

impl Hop for Mqtt {
    fn send(&mut self) {
        self.publisher.write_all(&self.publish).unwrap();
    }
    fn receive(&mut self) {
        let (kind, body) = read_packet(&mut self.subscriber);
        assert_eq!((kind & 0xf0, body.len()), (0x30, 2 + 5 + 32), "PUBLISH");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (addr, ca, rate, secs) = (&args[1], &args[2], &args[3], &args[4]);
    let pid = args.get(5).filter(|p| p.as_str() != "palaver");
    let palaver_at = args.iter().position(|a| a == "palaver");
    let rate: f64 = rate.parse().unwrap();
    let secs: u64 = secs.parse().unwrap();
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = Arc::new(
        ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut hop: Box<dyn Hop> = match palaver_at {
        Some(i) => Box::new(palaver::Palaver::connect(addr, &config, &args[i + 1..i + 5])),
        None => Box::new(Mqtt::connect(addr, &config)),
    };

    // Warm-up (1 s, like palaver-bench's --settle), then the measurement.
    let interval = Duration::from_secs_f64(1.0 / rate);
    let warm_end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm_end {
        hop.send();
        hop.receive();
        hop.after();
        std::thread::sleep(interval);
    }
    let cpu0 = pid.and_then(|p| cpu_ticks(p));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut next_at = start;
    let mut samples: Vec<u64> = Vec::with_capacity((rate as usize + 1) * secs as usize);
    while next_at < end {
        let now = Instant::now();
        if next_at > now {
            std::thread::sleep(next_at - now);
        }
        let written = Instant::now();
        hop.send();
        hop.receive();
        let got = Instant::now();
        hop.after();
        samples.push(got.duration_since(written).as_micros() as u64);
        next_at = (next_at + interval).max(got);
    }
    let cpu1 = pid.and_then(|p| cpu_ticks(p));
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "samples {}  p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us",
        samples.len(),
        q(0.50),
        q(0.90),
        q(0.99),
        q(0.999),
        samples[samples.len() - 1]
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        // Clock ticks are 10 ms (USER_HZ 100).
        let us = (b - a) as f64 * 10_000.0 / samples.len() as f64;
        println!("server CPU {} ticks over the run, {:.1} us per message", b - a, us);
    }
}
