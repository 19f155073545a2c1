//! The Redis key schema, in one place.
//!
//! Key layout — every key carries a hash tag, so everything one call touches
//! for one conversation or one user lives in one slot:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `c:{<conv>}:seq` | string | last allocated seq (INCR) |
//! | `c:{<conv>}:h` | zset | history window: score seq, member `%020d seq` ++ Message (seq 0) |
//! | `c:{<conv>}:dd` | hash | dedup: client_msg_id → `seq appended_ms`, only for messages in the window |
//! | `c:{<conv>}:arch` | string | with an archive: highest seq the archiver confirmed (all seqs up to it are in Cassandra; the trim never passes it) |
//! | `c:{<conv>}:dq` | list | dedup order: `seq:client_msg_id`, oldest first (trimmed with the history) |
//! | `c:{<conv>}:d:<hex cmid>` | string, PX ttl | legacy dedup key (before the window-bound hash): read, never written |
//! | `c:{<conv>}:r:<kind>` | hash | receipt marks, user → seq |
//! | `c:{<conv>}:g` | hash | group record: title, created |
//! | `c:{<conv>}:m` | hash | group members: user → role |
//! | `c:{<conv>}:chan` | hash | channel record: title, settings (protobuf), created_ms, member_count, admin_count (the counts follow each change) |
//! | `c:{<conv>}:cm` | zset | channel members, score 0: a page is `ZRANGE BYLEX` from `(<after>` (`channel_page.lua`) |
//! | `c:{<conv>}:cr` | hash | channel roles: member → role (a membership check is one HGET) |
//! | `c:{<conv>}:rp` | hash | channel read positions: user → seq (`raise_read_position.lua`, raise-only; dropped with the member) |
//! | `c:{<conv>}:w` | set | a direct conversation's users who have written in it (`append.lua`; both → it counts for presence) |
//! | `u:{<user>}:convs` | set | the user's conversations |
//! | `u:{<user>}:grps` | set | the user's groups (the `grp:` ids of `convs`) |
//! | `u:{<user>}:adds:<day>` | hash, EX 2 days | group adds of the user on a UTC day: `a:<adder>` → count, `s` → count by strangers |
//! | `u:{<user>}:push` | set | conversations with a pending push |
//! | `u:{<user>}:ptok` | hash | push registrations: device → `<registered_ms>\x1f<apns\|fcm>\x1f<production\|sandbox\|>\x1f<apns topic>\x1f<locale>\x1f<token>` (`register_push.lua`, `invalidate_push.lua`; at most `max_push_devices_per_user` fields) |
//! | `pt:{<platform>:<token>}` | string | the one owner of a registered push token: `<user>\x1f<device>` (`push_owner.lua`; claimed by a registration, released when it ends) |
//! | `u:{<user>}:mute` | zset | muted conversations, score = muted until (Unix ms, `+inf` for ever) (`set_mute.lua`; ran-out entries dropped on write; at most `max_mutes_per_user`) |
//! | `u:{<user>}:sess` | hash | device → `<conn>\|<gateway>` |
//! | `u:{<user>}:seen` | string | last seen, ms |
//! | `u:{<user>}:q:<day>` / `c:{<conv>}:q:<day>` | string, EX | bytes stored that UTC day (storage quotas) |
//! | `c:{<group>}:qm:<hour>` | string, EX | membership changes of the group that UTC hour |
//! | `gw:{gw}:lease:<id>` | string, PX | gateway lease (alive while present) |
//! | `gw:{gw}:known` | set | gateways that ever registered |
//! | `gw:{gw}:reap:<id>` | string, EX | lock: one gateway reaps a dead one |
//! | `gwc:{<id>}` | hash | a gateway's connections: conn → user \x1f device |
//! | `cfg:{tier}:limits` | hash | the limits the router tier enforces (max_group_members, max_body_bytes, max_batch, max_channel_members) |
//! | `cfg:{tier}:epoch` | string | the history epoch (SPEC §7): set by the first read of a dataset that has none |
//!
//! The gateway keys share one tag so a lease check of every gateway is one
//! command. A session on a gateway that registered (`known`) but whose lease
//! is gone is treated as absent by every read.

use palaver_protocol::pb;

use crate::api::SessionAddr;
use crate::store::QuotaOwner;

pub(super) const SEQ_PREFIX_LEN: usize = 20;
/// Suffix of a conversation's archived seq (`c:{<conv>}:arch`).
pub(super) const ARCHIVED_SUFFIX: &str = "arch";
pub(super) const LEASE_PREFIX: &str = "gw:{gw}:lease:";
pub(super) const KNOWN_GATEWAYS: &str = "gw:{gw}:known";
/// Pub/sub channel carrying `PresenceChanges` (one message per gateway per
/// tick with changes).
pub const PRESENCE_CHANNEL: &str = "palaver.presence";

/// The limits the router tier enforces ([`crate::api::TierLimits`]): a hash
/// each router writes at start and gateways read.
pub(super) const TIER_LIMITS: &str = "cfg:{tier}:limits";
/// The history epoch ([`crate::store::ConversationStore::history_epoch`]).
pub(super) const HISTORY_EPOCH: &str = "cfg:{tier}:epoch";

pub(super) fn conv_key(conversation_id: &str, suffix: &str) -> String {
    format!("c:{{{conversation_id}}}:{suffix}")
}

pub(super) fn user_key(user_id: &str, suffix: &str) -> String {
    format!("u:{{{user_id}}}:{suffix}")
}

pub(super) fn dedup_key(conversation_id: &str, client_msg_id: &[u8]) -> String {
    let mut key = conv_key(conversation_id, "d:");
    for b in client_msg_id {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// A user's group-add counts of UTC day `day` (see the key layout).
pub(super) fn adds_key(user_id: &str, day: i64) -> String {
    user_key(user_id, &format!("adds:{day}"))
}

/// The quota counter of `owner` in period `period`.
pub(super) fn quota_key(owner: &QuotaOwner, period: u32) -> String {
    match owner {
        QuotaOwner::Account(user_id) => user_key(user_id, &format!("q:{period}")),
        QuotaOwner::Conversation(id) => conv_key(id, &format!("q:{period}")),
        QuotaOwner::MembershipChanges(id) => conv_key(id, &format!("qm:{period}")),
    }
}

/// The owner key of a push token (see the key layout).
pub(super) fn push_owner_key(platform: &str, token: &str) -> String {
    format!("pt:{{{platform}:{token}}}")
}

pub(super) fn receipt_key(conversation_id: &str, kind: pb::ReceiptKind) -> String {
    conv_key(conversation_id, &format!("r:{}", kind as i32))
}

pub(super) fn lease_key(gateway_id: &str) -> String {
    format!("{LEASE_PREFIX}{gateway_id}")
}

/// The lock of one gateway's reap (see the key layout).
pub(super) fn reap_lock_key(gateway_id: &str) -> String {
    format!("gw:{{gw}}:reap:{gateway_id}")
}

pub(super) fn gateway_conns_key(gateway_id: &str) -> String {
    format!("gwc:{{{gateway_id}}}")
}

/// `<conn>|<gateway>`: the conn first so any gateway id is allowed.
pub fn encode_addr(addr: &SessionAddr) -> String {
    format!("{}|{}", addr.conn, addr.gateway_id)
}

pub fn decode_addr(s: &str) -> Option<SessionAddr> {
    let (conn, gateway_id) = s.split_once('|')?;
    Some(SessionAddr {
        gateway_id: gateway_id.into(),
        conn: conn.parse().ok()?,
    })
}
