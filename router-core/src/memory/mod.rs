//! In-memory implementation of the store traits, for the embedded engine and
//! for tests. Single-threaded (`&mut self`): the embedded engine owns it on
//! its worker thread. Never fails.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use palaver_protocol::pb;

use crate::api::SessionAddr;
use crate::logic::Clock;
use crate::store::QuotaOwner;

mod channels;
mod conversations;
pub use conversations::apply_quota_charge;
mod history;
mod push;
mod sessions;
mod users;

use history::History;

#[derive(Default)]
pub struct MemoryStore {
    conversations: HashMap<String, ConversationState>,
    users: HashMap<String, UserState>,
    /// Online devices and last seen, per user who ever had a session. Apart
    /// from `users` so an idle user (the common case: online, no messages)
    /// costs one small entry here and nothing there.
    presence: HashMap<Box<str>, DevicesOnline>,
    /// Gateway ids, shared by every device entry on that gateway (an embedded
    /// node has one), with how many devices hold each; an id goes when its
    /// last device does. Counted, not judged by `Arc::strong_count`: the
    /// addresses the store hands out share the id too.
    gateway_ids: HashMap<Arc<str>, usize>,
    /// Gateways that registered (`GatewayRegistry`): their sessions count
    /// only while their lease runs.
    known_gateways: HashSet<String>,
    /// Gateway → when its lease runs out (store clock, ms).
    leases: HashMap<String, i64>,
    /// Judges lease expiry; the system clock when `None` (a test injects a
    /// manual one to expire a lease without sleeping).
    clock: Option<Arc<dyn Clock>>,
    /// Entries [`UserStore::presence_links`] looked at, ever (see
    /// [`MemoryStore::visibility_lookups`]).
    visibility_lookups: u64,
    /// Quota counters: owner → (period, used). Entries of periods that are
    /// over are pruned whenever the map has doubled since the last prune.
    quotas: HashMap<QuotaOwner, (u32, u64)>,
    quotas_pruned_at: usize,
    /// Push registrations and mutes (`push.rs`).
    push: push::PushState,
    /// New with every store: this one's history dies with it.
    history_epoch: HistoryEpoch,
}

/// A fresh epoch by default ([`crate::store::new_history_epoch`]).
struct HistoryEpoch(u64);

impl Default for HistoryEpoch {
    fn default() -> Self {
        Self(crate::store::new_history_epoch())
    }
}

#[derive(Default)]
struct ConversationState {
    last_seq: u64,
    /// The stored window (contiguous seqs, oldest first) and its dedup index.
    history: History,
    /// (user, receipt kind) → mark
    receipts: HashMap<(String, i32), u64>,
    group: Option<GroupState>,
    channel: Option<channels::ChannelState>,
    /// A direct conversation `dm:<a>:<b>`: bit 0 set once `a` has written
    /// in it, bit 1 once `b` has (SPEC §10: it counts for presence when
    /// both are set).
    direct_writers: u8,
}

struct GroupState {
    title: String,
    members: BTreeMap<String, pb::Role>,
    created_ms: i64,
}

#[derive(Default)]
struct UserState {
    conversations: BTreeSet<String>,
    /// The groups among `conversations` (walked by
    /// [`UserStore::presence_links`], counted for the per-user group cap).
    groups: HashSet<String>,
    push_pending: HashSet<String>,
    /// The latest day's group-add counts (older days are forgotten).
    adds: Option<DayAdds>,
}

/// One UTC day's adds of a user to groups (SPEC §11's add limits).
struct DayAdds {
    day: i64,
    by_adder: HashMap<String, u32>,
    by_strangers: u32,
}

/// A user's online devices, ascending by device id (a Vec, not a map: users
/// have one to a few devices, and the embedded gateway pays this per
/// connection: ~190 bytes for a one-device user with the map entry), and
/// when the last one went offline.
#[derive(Default)]
struct DevicesOnline {
    devices: Vec<DeviceOnline>,
    last_seen_ms: i64,
}

struct DeviceOnline {
    device_id: Box<str>,
    gateway_id: Arc<str>,
    conn: u64,
}

impl DeviceOnline {
    fn addr(&self) -> SessionAddr {
        SessionAddr {
            gateway_id: self.gateway_id.clone(),
            conn: self.conn,
        }
    }

    fn is_at(&self, addr: &SessionAddr) -> bool {
        self.conn == addr.conn && *self.gateway_id == *addr.gateway_id
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose gateway leases run out by `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock: Some(clock),
            ..Self::default()
        }
    }

    /// How many entries [`UserStore::presence_links`] has looked at since
    /// the store was made: per pair, the pair's direct conversation and one
    /// probe per group of the viewer. Tests use it to check that the work
    /// of a presence answer does not depend on data the asker may not see.
    pub fn visibility_lookups(&self) -> u64 {
        self.visibility_lookups
    }

    /// Drops a device's hold on its gateway id; the id goes with the last.
    fn release_gateway_id(&mut self, id: &str) {
        if let Some(devices) = self.gateway_ids.get_mut(id) {
            *devices -= 1;
            if *devices == 0 {
                self.gateway_ids.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::history::CHUNK;
    use super::*;
    use crate::api::Session;
    use crate::store::{Appended, ConversationStore, RangeRead, Retention, SessionStore};

    fn retention(now_ms: i64, window: usize) -> Retention {
        Retention {
            now_ms,
            dedup_ttl_ms: 1000,
            history_window: window,
        }
    }

    fn message(cmid: u8, sender: &str) -> pb::Message {
        pb::Message {
            conversation_id: "c".into(),
            client_msg_id: vec![cmid; 16],
            message_id: format!("m{cmid}"),
            sender_user_id: sender.into(),
            ..Default::default()
        }
    }

    fn stored(a: Appended) -> pb::Message {
        match a {
            Appended::Stored(m) => m,
            other => panic!("expected a stored message, got {other:?}"),
        }
    }

    #[test]
    fn append_assigns_seq_dedups_and_trims_window() {
        let mut s = MemoryStore::new();
        for i in 1..=5u8 {
            let m = stored(
                s.append_message("c", message(i, "u"), &retention(0, 3))
                    .unwrap(),
            );
            assert_eq!(m.seq, i as u64);
        }
        // Duplicate of a message still in the window: original ack, no seq used.
        match s
            .append_message("c", message(4, "u"), &retention(999, 3))
            .unwrap()
        {
            Appended::Duplicate(ack) => {
                assert_eq!(ack.seq, 4);
                assert_eq!(ack.message_id, "m4");
                assert_eq!(ack.conversation_id, "c");
            }
            other => panic!("expected duplicate, got {other:?}"),
        }
        assert_eq!(s.last_seqs(&["c".into()]).unwrap(), vec![5]);
        // Dedup is tied to the window: seq 2 has left it, so the same
        // client_msg_id is a new message.
        let m = stored(
            s.append_message("c", message(2, "u"), &retention(1000, 3))
                .unwrap(),
        );
        assert_eq!(m.seq, 6);
        // ... and that new message is deduplicated in turn (its id's older,
        // evicted entry in the same chunk does not hide it).
        match s
            .append_message("c", message(2, "u"), &retention(1000, 3))
            .unwrap()
        {
            Appended::Duplicate(ack) => assert_eq!(ack.seq, 6),
            other => panic!("expected duplicate, got {other:?}"),
        }
        // Window of 3: seqs 4..=6 remain.
        let all = s
            .messages_after(&[RangeRead {
                conversation_id: "c".into(),
                after_seq: 0,
                limit: 100,
                max_bytes: usize::MAX,
            }])
            .unwrap();
        let seqs: Vec<u64> = all[0].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
    }

    #[test]
    fn window_and_dedup_index_stay_bounded() {
        let mut s = MemoryStore::new();
        let window = 1000;
        let cmid = |n: u32| n.to_le_bytes().to_vec();
        for n in 1..=20 * CHUNK as u32 + 7 {
            let m = pb::Message {
                client_msg_id: cmid(n),
                message_id: format!("m{n}"),
                ..Default::default()
            };
            stored(s.append_message("c", m, &retention(0, window)).unwrap());
        }
        let last = 20 * CHUNK as u64 + 7;
        let history = &s.conversations["c"].history;
        assert_eq!(history.len(), window);
        assert_eq!(history.front().unwrap().seq, last - window as u64 + 1);
        let (indexed, chunks) = history.footprint();
        assert!(indexed < window + CHUNK, "{indexed} ids indexed");
        assert!(chunks <= window / CHUNK + 2);
        // Oldest message in the window still dedups; one just before it does not.
        let oldest = (last - window as u64 + 1) as u32;
        let retry = |n: u32| pb::Message {
            client_msg_id: cmid(n),
            ..Default::default()
        };
        match s.append_message("c", retry(oldest), &retention(0, window)) {
            Ok(Appended::Duplicate(ack)) => assert_eq!(ack.seq, oldest as u64),
            other => panic!("expected duplicate, got {other:?}"),
        }
        let m = stored(
            s.append_message("c", retry(oldest - 1), &retention(0, window))
                .unwrap(),
        );
        assert_eq!(m.seq, last + 1);
        // History reads see the contiguous window across chunk boundaries.
        let slice = s.messages_before("c", 0, 2 * CHUNK, usize::MAX).unwrap();
        let seqs: Vec<u64> = slice.messages.iter().map(|m| m.seq).collect();
        let want: Vec<u64> = (last + 2 - 2 * CHUNK as u64..=last + 1).collect();
        assert_eq!(seqs, want);
        assert!(slice.has_more);
    }

    #[test]
    fn gateway_ids_are_shared_and_go_with_the_last_device() {
        let mut s = MemoryStore::new();
        let session = |user: &str, device: &str, gateway: &str, conn| Session {
            user_id: user.into(),
            device_id: device.into(),
            addr: SessionAddr {
                gateway_id: gateway.into(),
                conn,
            },
        };
        let a = session("a", "phone", "g1", 1);
        let b = session("b", "phone", "g1", 2);
        let a_moved = session("a", "phone", "g2", 3);
        s.open_session(&a);
        s.open_session(&b);
        assert_eq!(s.gateway_ids.len(), 1, "one shared id for g1");
        assert_eq!(
            s.presence["a"].devices.capacity(),
            1,
            "an online user's device list holds exactly its one device"
        );
        // a reconnects through g2: replaces its g1 device, g1 stays for b.
        let opened = s.open_session(&a_moved);
        assert_eq!(opened.replaced, Some(a.addr.clone()));
        assert_eq!(s.gateway_ids.len(), 2);
        s.close_session(&b, 9, true);
        assert_eq!(s.gateway_ids.len(), 1, "g1 went with its last device");
        assert_eq!(
            s.sessions_of_users(&["a"]).unwrap().of(0),
            std::slice::from_ref(&a_moved.addr)
        );
        s.close_session(&a_moved, 10, true);
        assert!(s.gateway_ids.is_empty());
    }
}
