//! The gateway lease/registry and the batched presence writes of the gateway
//! bridge (one pipeline per gateway per tick), plus the lease check every
//! session read uses.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::Value;

use crate::api::{Session, SessionAddr};
use crate::store::StoreResult;

use super::keys::{
    decode_addr, encode_addr, gateway_conns_key, lease_key, user_key, KNOWN_GATEWAYS, LEASE_PREFIX,
    PRESENCE_CHANNEL,
};
use super::{corrupt, from_value, RedisStore};

/// One opened or closed session for a presence tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionChange {
    Opened(Session),
    Closed { session: Session, at_ms: i64 },
}

/// What a presence tick found out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickResult {
    /// Connections replaced by a newer one of the same device (they must get
    /// `GoAway(REPLACED)`), with the user and device.
    pub replaced: Vec<(Session, SessionAddr)>,
    /// Users whose presence changed: (user, online, last_seen_ms).
    pub changes: Vec<(String, bool, i64)>,
}

impl RedisStore {
    /// For each gateway id: is it known to be dead (registered, lease gone)?
    pub(super) fn dead_gateways_among(
        &mut self,
        gateway_ids: &HashSet<String>,
    ) -> StoreResult<HashSet<String>> {
        if gateway_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<&String> = gateway_ids.iter().collect();
        let mut cmds = Vec::with_capacity(ids.len() + 1);
        let mut known = redis::cmd("SMISMEMBER");
        known.arg(KNOWN_GATEWAYS).arg(&ids);
        cmds.push(known);
        for id in &ids {
            cmds.push(redis::cmd("EXISTS").arg(lease_key(id)).clone());
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let known: Vec<bool> = from_value(replies.next().unwrap_or(Value::Nil))?;
        let mut dead = HashSet::new();
        for ((id, known), lease) in ids.iter().zip(known).zip(replies) {
            let alive: bool = from_value(lease)?;
            if known && !alive {
                dead.insert((*id).clone());
            }
        }
        Ok(dead)
    }

    // ---- Gateway presence (the bridge's batcher) -------------------------

    /// Registers a gateway: its lease, and its id in the known set. If the
    /// same id left sessions behind (a crash and restart faster than the
    /// lease), they are reaped first; the result holds the presence changes.
    pub fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<(String, bool, i64)>> {
        let changes = self.reap_sessions_of(gateway_id, now_ms)?;
        self.pipeline(vec![
            redis::cmd("SET")
                .arg(lease_key(gateway_id))
                .arg(now_ms)
                .arg("PX")
                .arg(lease_ttl.as_millis() as u64)
                .clone(),
            redis::cmd("SADD")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
        ])?;
        Ok(changes)
    }

    /// One presence tick of one gateway, in ONE pipeline: renew the lease,
    /// register opened sessions, unregister closed ones (setting last-seen
    /// when a user's last session closes), clear the push-pending marks of
    /// users who connected. Commands: 1 + a few per change.
    pub fn presence_tick(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<TickResult> {
        let mut cmds = Vec::with_capacity(1 + 3 * changes.len());
        cmds.push(
            redis::cmd("SET")
                .arg(lease_key(gateway_id))
                .arg(now_ms)
                .arg("PX")
                .arg(lease_ttl.as_millis() as u64)
                .clone(),
        );
        let conns = gateway_conns_key(gateway_id);
        for change in changes {
            match change {
                SessionChange::Opened(s) => {
                    let addr = encode_addr(&s.addr);
                    cmds.push(Self::evalsha(
                        &self.scripts.open_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[s.device_id.as_bytes(), addr.as_bytes()],
                    ));
                    cmds.push(
                        redis::cmd("HSET")
                            .arg(&conns)
                            .arg(s.addr.conn)
                            .arg(format!("{}\x1f{}", s.user_id, s.device_id))
                            .clone(),
                    );
                    cmds.push(redis::cmd("DEL").arg(user_key(&s.user_id, "push")).clone());
                }
                SessionChange::Closed { session: s, at_ms } => {
                    let addr = encode_addr(&s.addr);
                    cmds.push(Self::evalsha(
                        &self.scripts.close_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[
                            s.device_id.as_bytes(),
                            addr.as_bytes(),
                            at_ms.to_string().as_bytes(),
                        ],
                    ));
                    cmds.push(redis::cmd("HDEL").arg(&conns).arg(s.addr.conn).clone());
                }
            }
        }
        let replies = self.pipeline(cmds)?;
        let mut replies = replies.into_iter().skip(1);
        let mut result = TickResult::default();
        for change in changes {
            match change {
                SessionChange::Opened(s) => {
                    let (prev, had): (String, i64) =
                        from_value(replies.next().unwrap_or(Value::Nil))?;
                    replies.next();
                    replies.next();
                    let prev = if prev.is_empty() {
                        None
                    } else {
                        decode_addr(&prev)
                    };
                    if let Some(prev) = prev.filter(|p| *p != s.addr) {
                        result.replaced.push((s.clone(), prev));
                    }
                    if had == 0 {
                        result.changes.push((s.user_id.clone(), true, 0));
                    }
                }
                SessionChange::Closed { session: s, at_ms } => {
                    let (_removed, offline): (i64, i64) =
                        from_value(replies.next().unwrap_or(Value::Nil))?;
                    replies.next();
                    if offline == 1 {
                        result.changes.push((s.user_id.clone(), false, *at_ms));
                    }
                }
            }
        }
        Ok(result)
    }

    /// Known gateways whose lease has expired (one command).
    pub fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        let cmd = Self::evalsha(
            &self.scripts.dead_gateways,
            &[KNOWN_GATEWAYS],
            &[LEASE_PREFIX.as_bytes()],
        );
        let mut replies = self.pipeline(vec![cmd])?;
        from_value(replies.pop().unwrap_or(Value::Nil))
    }

    /// Takes over a dead gateway if no other gateway is doing so: removes
    /// its sessions (users without another session go offline with
    /// last-seen `now_ms`) and forgets it. Returns the presence changes, or
    /// `None` if another gateway holds the reap lock.
    pub fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<(String, bool, i64)>>> {
        let locked: Option<String> = self.query(
            redis::cmd("SET")
                .arg(format!("gw:{{gw}}:reap:{dead_gateway_id}"))
                .arg(reaper_id)
                .arg("NX")
                .arg("EX")
                .arg(60),
        )?;
        if locked.is_none() {
            return Ok(None);
        }
        let changes = self.reap_sessions_of(dead_gateway_id, now_ms)?;
        self.query::<()>(redis::cmd("SREM").arg(KNOWN_GATEWAYS).arg(dead_gateway_id))?;
        Ok(Some(changes))
    }

    /// Removes every session registered on `gateway_id` (pipelined).
    fn reap_sessions_of(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<(String, bool, i64)>> {
        let conns_key = gateway_conns_key(gateway_id);
        let conns: HashMap<u64, String> = self.query(redis::cmd("HGETALL").arg(&conns_key))?;
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        let mut sessions = Vec::with_capacity(conns.len());
        for (conn, who) in conns {
            let Some((user_id, device_id)) = who.split_once('\x1f') else {
                return Err(corrupt(format!("gateway connection entry {who:?}")));
            };
            sessions.push(SessionChange::Closed {
                session: Session {
                    user_id: user_id.to_owned(),
                    device_id: device_id.to_owned(),
                    addr: SessionAddr {
                        gateway_id: gateway_id.to_owned(),
                        conn,
                    },
                },
                at_ms: now_ms,
            });
        }
        let mut changes = Vec::new();
        for chunk in sessions.chunks(1000) {
            let mut cmds = Vec::with_capacity(chunk.len());
            for change in chunk {
                if let SessionChange::Closed { session: s, at_ms } = change {
                    cmds.push(Self::evalsha(
                        &self.scripts.close_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[
                            s.device_id.as_bytes(),
                            encode_addr(&s.addr).as_bytes(),
                            at_ms.to_string().as_bytes(),
                        ],
                    ));
                }
            }
            for (change, reply) in chunk.iter().zip(self.pipeline(cmds)?) {
                let (_removed, offline): (i64, i64) = from_value(reply)?;
                if let (SessionChange::Closed { session, at_ms }, 1) = (change, offline) {
                    changes.push((session.user_id.clone(), false, *at_ms));
                }
            }
        }
        self.query::<()>(redis::cmd("DEL").arg(&conns_key))?;
        Ok(changes)
    }

    /// Clean shutdown of a gateway: its lease and registration go, its
    /// remaining sessions are removed; returns who went offline.
    pub fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<(String, bool, i64)>> {
        let changes = self.reap_sessions_of(gateway_id, now_ms)?;
        self.pipeline(vec![
            redis::cmd("DEL").arg(lease_key(gateway_id)).clone(),
            redis::cmd("SREM")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
        ])?;
        Ok(changes)
    }

    /// PUBLISH one encoded presence batch.
    pub fn publish_presence(&mut self, payload: &[u8]) -> StoreResult<()> {
        self.query::<i64>(redis::cmd("PUBLISH").arg(PRESENCE_CHANNEL).arg(payload))
            .map(|_| ())
    }
}
