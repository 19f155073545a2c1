//! The two Kafka requests the stack makes, spoken over a plain TCP socket:
//! Metadata (brokers, topics, partition leaders) for readiness waits and
//! `leader_of`, and CreateTopics. A client library would be more code to
//! compile than this is to read: librdkafka (rdkafka-sys) made every crate
//! depending on the stack, the `palaver` CLI included, build a C library.
//!
//! The versions are the newest non-flexible ones the stack needs (plain
//! int16/int32 lengths, no tagged fields): Metadata v4 and CreateTopics v4
//! (v4 is the first to accept -1, "the broker's default", as replication
//! factor). Apache Kafka 4.1 serves Metadata v0–13 and CreateTopics v2–7.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const METADATA_KEY: i16 = 3;
const METADATA_VERSION: i16 = 4;
const CREATE_TOPICS_KEY: i16 = 19;
const CREATE_TOPICS_VERSION: i16 = 4;
const CLIENT_ID: &str = "palaver-stack";
/// Kafka's TOPIC_ALREADY_EXISTS: creating an existing topic is no error here.
const TOPIC_ALREADY_EXISTS: i16 = 36;
/// A response larger than this is not one of ours (a wrong port, garbage).
const MAX_RESPONSE: usize = 64 << 20;

/// What a broker's Metadata response says.
#[derive(Debug)]
pub(crate) struct Metadata {
    /// Node ids of the brokers the cluster lists (unfenced ones only).
    pub brokers: Vec<i32>,
    pub topics: Vec<TopicMetadata>,
}

#[derive(Debug)]
pub(crate) struct TopicMetadata {
    pub name: String,
    /// Kafka error code for the topic (0: none; 3: it does not exist).
    pub error: i16,
    pub partitions: Vec<PartitionMetadata>,
}

#[derive(Debug)]
pub(crate) struct PartitionMetadata {
    pub id: i32,
    /// Node id of the leader; negative while there is none.
    pub leader: i32,
}

impl Metadata {
    pub fn topic(&self, name: &str) -> Option<&TopicMetadata> {
        self.topics.iter().find(|t| t.name == name)
    }
}

impl TopicMetadata {
    /// The topic exists and every partition has a leader.
    pub fn led(&self) -> bool {
        self.error == 0
            && !self.partitions.is_empty()
            && self.partitions.iter().all(|p| p.leader >= 0)
    }
}

/// Metadata of `topics` (all topics when `None`) from the first node of
/// `bootstrap` (`host:port,...`) that answers.
pub(crate) fn metadata(
    bootstrap: &str,
    topics: Option<&[&str]>,
    timeout: Duration,
) -> Result<Metadata, String> {
    let mut body = Vec::new();
    match topics {
        None => put_i32(&mut body, -1),
        Some(names) => {
            put_i32(&mut body, names.len() as i32);
            for name in names {
                put_str(&mut body, name);
            }
        }
    }
    body.push(0); // allow_auto_topic_creation: false
    let reply = call_any(bootstrap, METADATA_KEY, METADATA_VERSION, &body, timeout)?;
    parse_metadata(&reply).map_err(|e| format!("Metadata response from {bootstrap}: {e}"))
}

fn parse_metadata(reply: &[u8]) -> Result<Metadata, String> {
    let mut r = Reader { buf: reply, pos: 0 };
    r.i32()?; // throttle_time_ms
    let mut brokers = Vec::new();
    for _ in 0..r.len()? {
        brokers.push(r.i32()?);
        r.string()?; // host
        r.i32()?; // port
        r.string()?; // rack
    }
    r.string()?; // cluster_id
    r.i32()?; // controller_id
    let mut topics = Vec::new();
    for _ in 0..r.len()? {
        let error = r.i16()?;
        let name = r.string()?.unwrap_or_default();
        r.i8()?; // is_internal
        let mut partitions = Vec::new();
        for _ in 0..r.len()? {
            r.i16()?; // the partition's error code
            let id = r.i32()?;
            let leader = r.i32()?;
            for _ in 0..2 {
                // replica_nodes, isr_nodes
                for _ in 0..r.len()? {
                    r.i32()?;
                }
            }
            partitions.push(PartitionMetadata { id, leader });
        }
        topics.push(TopicMetadata {
            name,
            error,
            partitions,
        });
    }
    Ok(Metadata { brokers, topics })
}

/// Asks the cluster at `bootstrap` to create `name` with `partitions`
/// partitions and `replication` replicas (-1: the broker's
/// `default.replication.factor`). Ok when it was created or already exists;
/// the partitions may not have leaders yet.
pub(crate) fn create_topic(
    bootstrap: &str,
    name: &str,
    partitions: u32,
    replication: i16,
    timeout: Duration,
) -> Result<(), String> {
    let mut body = Vec::new();
    put_i32(&mut body, 1);
    put_str(&mut body, name);
    put_i32(&mut body, partitions as i32);
    put_i16(&mut body, replication);
    put_i32(&mut body, 0); // assignments: none, the controller places replicas
    put_i32(&mut body, 0); // configs: the broker's defaults
    put_i32(&mut body, timeout.as_millis().min(i32::MAX as u128) as i32);
    body.push(0); // validate_only: false
    let reply = call_any(
        bootstrap,
        CREATE_TOPICS_KEY,
        CREATE_TOPICS_VERSION,
        &body,
        timeout,
    )?;
    let mut r = Reader {
        buf: &reply,
        pos: 0,
    };
    let parsed = (|| {
        r.i32()?; // throttle_time_ms
        let mut outcome = Ok(());
        for _ in 0..r.len()? {
            let topic = r.string()?.unwrap_or_default();
            let code = r.i16()?;
            let message = r.string()?.unwrap_or_default();
            if code != 0 && code != TOPIC_ALREADY_EXISTS {
                outcome = Err(format!(
                    "create topic {topic}: Kafka error {code} {message}"
                ));
            }
        }
        Ok::<_, String>(outcome)
    })();
    parsed.map_err(|e| format!("CreateTopics response from {bootstrap}: {e}"))?
}

/// Sends one request to each node of `bootstrap` in turn until one answers
/// (a killed node refuses the connection, a paused one times out).
fn call_any(
    bootstrap: &str,
    api_key: i16,
    version: i16,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let mut errors = Vec::new();
    for node in bootstrap.split(',').filter(|n| !n.is_empty()) {
        match call(node, api_key, version, body, timeout) {
            Ok(reply) => return Ok(reply),
            Err(e) => errors.push(format!("{node}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// One request/response on a fresh connection: size-prefixed request header
/// v1 (key, version, correlation id, client id) and body; the response
/// header v0 is the correlation id.
fn call(
    node: &str,
    api_key: i16,
    version: i16,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    const CORRELATION_ID: i32 = 1;
    let addr: SocketAddr = node
        .parse()
        .map_err(|e| format!("not an IP address and port: {e}"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let mut request = Vec::with_capacity(body.len() + 32);
    put_i32(&mut request, 0); // the size, set below
    put_i16(&mut request, api_key);
    put_i16(&mut request, version);
    put_i32(&mut request, CORRELATION_ID);
    put_str(&mut request, CLIENT_ID);
    request.extend_from_slice(body);
    let size = (request.len() - 4) as i32;
    request[..4].copy_from_slice(&size.to_be_bytes());
    stream
        .write_all(&request)
        .map_err(|e| format!("write: {e}"))?;
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .map_err(|e| format!("read: {e}"))?;
    let size = i32::from_be_bytes(size);
    if size < 4 || size as usize > MAX_RESPONSE {
        return Err(format!("response size {size}"));
    }
    let mut reply = vec![0u8; size as usize];
    stream
        .read_exact(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    if reply[..4] != CORRELATION_ID.to_be_bytes() {
        return Err("response to another request".into());
    }
    reply.drain(..4);
    Ok(reply)
}

fn put_i16(buf: &mut Vec<u8>, v: i16) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_i32(buf: &mut Vec<u8>, v: i32) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_i16(buf, s.len() as i16);
    buf.extend_from_slice(s.as_bytes());
}

/// Reads a response's big-endian fields in order; running past its end is
/// an error, not a panic.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn i8(&mut self) -> Result<i8, String> {
        Ok(self.take(1)?[0] as i8)
    }

    fn i16(&mut self) -> Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An array's element count (a null array, -1, has none).
    fn len(&mut self) -> Result<usize, String> {
        Ok(self.i32()?.max(0) as usize)
    }

    /// A string or nullable string (length -1: null).
    fn string(&mut self) -> Result<Option<String>, String> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(None);
        }
        let bytes = self.take(len as usize)?;
        Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metadata_response_is_parsed_and_a_truncated_one_is_an_error() {
        let mut reply = Vec::new();
        put_i32(&mut reply, 0); // throttle
        put_i32(&mut reply, 1); // one broker
        put_i32(&mut reply, 7);
        put_str(&mut reply, "127.0.0.1");
        put_i32(&mut reply, 9092);
        put_i16(&mut reply, -1); // no rack
        put_i16(&mut reply, -1); // no cluster id
        put_i32(&mut reply, 7); // controller
        put_i32(&mut reply, 1); // one topic
        put_i16(&mut reply, 0);
        put_str(&mut reply, "palaver.inbound");
        reply.push(0);
        put_i32(&mut reply, 2); // two partitions
        for (id, leader) in [(0, 7), (1, -1)] {
            put_i16(&mut reply, 0);
            put_i32(&mut reply, id);
            put_i32(&mut reply, leader);
            put_i32(&mut reply, 1);
            put_i32(&mut reply, 7);
            put_i32(&mut reply, 0);
        }
        let md = parse_metadata(&reply).expect("parsed");
        assert_eq!(md.brokers, vec![7]);
        let topic = md.topic("palaver.inbound").expect("topic");
        assert_eq!(topic.partitions.len(), 2);
        assert_eq!(topic.partitions[1].id, 1);
        assert!(!topic.led(), "partition 1 has no leader");
        assert!(parse_metadata(&reply[..reply.len() - 3]).is_err());
    }
}
