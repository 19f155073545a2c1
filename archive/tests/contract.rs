//! The archive's contract, on a real Apache Cassandra node (started by the
//! test kit on free loopback ports): what the router and the archiver rely on.

use palaver_archive::{ArchiveConfig, CassandraArchive, BUCKET_SEQS};
use palaver_protocol::pb;
use palaver_testkit::stack::{Cassandra, CassandraCluster};
use prost::Message as _;

fn message(conversation_id: &str, seq: u64, body_len: usize) -> pb::Message {
    pb::Message {
        conversation_id: conversation_id.into(),
        seq,
        message_id: format!("m{seq}"),
        sender_user_id: "alice".into(),
        sender_device_id: "phone".into(),
        client_msg_id: seq.to_be_bytes().to_vec(),
        kind: 0,
        body: vec![(seq % 251) as u8; body_len],
        server_time_ms: 1_700_000_000_000 + seq as i64,
        ..Default::default()
    }
}

fn seqs(messages: &[pb::Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

#[test]
fn the_archive_keeps_every_message_once_by_seq_and_pages_it_both_ways() {
    let node = Cassandra::start().expect("start Cassandra");
    let mut config = ArchiveConfig::new(vec![node.address()]);
    config.keyspace = "contract".into();
    let archive = CassandraArchive::connect(&config).expect("connect");

    // Three buckets' worth in one conversation, a few in another.
    let n = 2 * BUCKET_SEQS + 500;
    let conv = "dm:alice:bob";
    let all: Vec<pb::Message> = (1..=n).map(|s| message(conv, s, 40)).collect();
    let other: Vec<pb::Message> = (1..=5).map(|s| message("grp:other", s, 10)).collect();
    let rows: Vec<(&str, &pb::Message)> = all
        .iter()
        .map(|m| (conv, m))
        .chain(other.iter().map(|m| ("grp:other", m)))
        .collect();
    archive.write(&rows).expect("write");
    // Written again (an archiver replaying its batch): still once each.
    archive.write(&rows[..300]).expect("write again");

    // Oldest first, across the bucket boundaries, exactly what was written.
    let read = archive
        .read_after(conv, 0, n + 1, n as usize + 10, 0)
        .unwrap();
    assert_eq!(seqs(&read), (1..=n).collect::<Vec<_>>());
    assert_eq!(read[1234], all[1234], "a message comes back byte for byte");
    // The upper bound is exclusive, the lower too.
    let read = archive.read_after(conv, 995, 1003, 100, 0).unwrap();
    assert_eq!(seqs(&read), (996..=1002).collect::<Vec<_>>());

    // Newest first below a bound, paged down to seq 1 with no gap.
    let mut before = n + 1;
    let mut paged = Vec::new();
    loop {
        let page = archive.read_before(conv, before, 333, 0).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(
            page.windows(2).all(|w| w[0].seq == w[1].seq + 1),
            "newest first, no gap"
        );
        before = page.last().unwrap().seq;
        paged.extend(page);
    }
    assert_eq!(paged.len() as u64, n);
    assert_eq!(paged.last().unwrap().seq, 1);

    // Conversations are apart.
    let read = archive.read_after("grp:other", 0, 100, 100, 0).unwrap();
    assert_eq!(seqs(&read), vec![1, 2, 3, 4, 5]);
    assert!(archive
        .read_after("grp:none", 0, 100, 100, 0)
        .unwrap()
        .is_empty());

    // A byte budget: at least one message, and no more than fit.
    let size = all[0].encoded_len();
    let read = archive.read_after(conv, 0, n + 1, 100, size * 3).unwrap();
    assert_eq!(seqs(&read), vec![1, 2, 3]);
    let read = archive.read_before(conv, 10, 100, 1).unwrap();
    assert_eq!(seqs(&read), vec![9]);
}

#[test]
fn a_bad_configuration_says_what_to_fix() {
    let mut config = ArchiveConfig::new(vec!["127.0.0.1:9".into()]);
    config.keyspace = "no-dashes".into();
    let e = CassandraArchive::connect(&config).err().expect("refused");
    assert!(e.to_string().contains("letters, digits and _"), "{e}");
    let mut config = ArchiveConfig::new(vec!["127.0.0.1:9".into()]);
    config.timeout = std::time::Duration::from_millis(500);
    let e = CassandraArchive::connect(&config)
        .err()
        .expect("nothing listens there");
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
}

/// Three nodes, replication factor 3, QUORUM writes and reads: one node
/// SIGKILLed mid-stream and the archive goes on (2 of 3 replicas answer);
/// every message reads back in order; with the node back and another one
/// killed, the quorum still returns everything, the writes the restarted
/// node missed included.
#[test]
fn three_nodes_at_quorum_keep_writing_and_reading_with_one_node_down() {
    let mut cluster = CassandraCluster::start(3).expect("start 3 Cassandra nodes");
    let mut config = ArchiveConfig::new(cluster.addresses());
    config.keyspace = "quorum".into();
    config.replication_factor = 3;
    let archive = CassandraArchive::connect(&config).expect("connect");
    let conv = "grp:quorum";
    let all: Vec<pb::Message> = (1..=3_000).map(|s| message(conv, s, 40)).collect();
    // Each chunk until it is written (idempotent by key): until gossip has
    // the nodes up at each other (a new ring, a restarted node), a
    // coordinator may find too few replicas alive, and a request the driver
    // sent to a node that just died fails. Returns the refusals met.
    let write = |range: std::ops::Range<usize>| {
        let began = std::time::Instant::now();
        let mut refused = 0;
        for chunk in all[range].chunks(100) {
            let rows: Vec<(&str, &pb::Message)> = chunk.iter().map(|m| (conv, m)).collect();
            while let Err(e) = archive.write(&rows) {
                refused += 1;
                assert!(
                    began.elapsed() < std::time::Duration::from_secs(120),
                    "QUORUM writes refused for 120 s: {e}"
                );
            }
        }
        (began.elapsed(), refused)
    };
    let (took, refused) = write(0..1_000);
    eprintln!("1,000 written at QUORUM, all nodes up, in {took:?} ({refused} refusals while the ring formed)");
    cluster.nodes[2].kill();
    let (took, refused) = write(1_000..2_000);
    eprintln!("1,000 written at QUORUM with node 3 down in {took:?} ({refused} refusals)");
    let read = read_awaited(&archive, conv, 2_000, "node 3 down");
    assert_eq!(seqs(&read), (1..=2_000).collect::<Vec<_>>());

    cluster.nodes[2].restart().expect("node 3 back");
    let (took, refused) = write(2_000..3_000);
    eprintln!("1,000 written at QUORUM with node 3 back in {took:?} ({refused} refusals)");
    cluster.nodes[1].kill();
    // Nodes 1 and 3 answer: node 3 missed 1,001..=2,000, node 1 has them.
    let read = read_awaited(&archive, conv, 3_000, "node 2 down, node 3 back");
    assert_eq!(seqs(&read), (1..=3_000).collect::<Vec<_>>());
    assert_eq!(
        read[1_500], all[1_500],
        "a message written while node 3 was down"
    );
}

/// Every message of `conv` (1..=n) at QUORUM, retried until the cluster
/// answers: right after a node dies, a read the driver sent to it times
/// out, and until gossip has a restarted node up again too few replicas
/// may seem alive. Prints how long it took.
fn read_awaited(archive: &CassandraArchive, conv: &str, n: u64, state: &str) -> Vec<pb::Message> {
    let began = std::time::Instant::now();
    loop {
        match archive.read_after(conv, 0, n + 1, n as usize + 100, 0) {
            Ok(read) => {
                eprintln!(
                    "QUORUM read with {state}: answered after {:?}",
                    began.elapsed()
                );
                return read;
            }
            Err(e) => {
                assert!(
                    began.elapsed() < std::time::Duration::from_secs(120),
                    "no QUORUM read with {state} within 120 s: {e}"
                );
                eprintln!("QUORUM read with {state}, not yet: {e}");
            }
        }
    }
}
