//! `impl GatewayRegistry for RedisStore`: gateway leases, the registry and
//! reaping, the presence PUBLISH, plus the lease check every session read
//! uses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use palaver_protocol::pb;

use crate::api::{Session, SessionAddr};
use crate::store::{GatewayRegistry, SessionChange, StoreResult};

use super::keys::{
    encode_addr, gateway_conns_key, lease_key, reap_lock_key, user_key, KNOWN_GATEWAYS,
    LEASE_PREFIX, PRESENCE_CHANNEL,
};
use super::sessions::Verdict;
use super::{corrupt, from_value, RedisStore};

pub(super) fn offline_presence(user_id: &str, at_ms: i64) -> pb::Presence {
    pb::Presence {
        user_id: user_id.to_owned(),
        online: false,
        last_seen_ms: at_ms,
    }
}

impl RedisStore {
    /// For each gateway id: is it known to be dead (registered, lease gone)?
    pub(crate) fn dead_gateways_among(
        &mut self,
        gateway_ids: &HashSet<Arc<str>>,
    ) -> StoreResult<HashSet<Arc<str>>> {
        if gateway_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<&str> = gateway_ids.iter().map(|id| &**id).collect();
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
                dead.insert(Arc::from(*id));
            }
        }
        Ok(dead)
    }
}

impl GatewayRegistry for RedisStore {
    fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        let changes = self.reap_sessions_of(gateway_id, now_ms, false)?;
        self.pipeline(vec![
            renew_lease_cmd(gateway_id, lease_ttl, now_ms),
            redis::cmd("SADD")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
        ])?;
        Ok(changes)
    }

    /// Known gateways whose lease has expired (one command).
    fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        let cmd = Self::evalsha(
            &self.scripts.dead_gateways,
            &[KNOWN_GATEWAYS],
            &[LEASE_PREFIX.as_bytes()],
        );
        let mut replies = self.pipeline(vec![cmd])?;
        from_value(replies.pop().unwrap_or(Value::Nil))
    }

    /// Takes over a dead gateway if no other gateway is doing so (a lock
    /// key for 60 s): removes its sessions (users without another session
    /// go offline with last-seen `now_ms`) and forgets it. Returns the
    /// presence changes, or `None` if another gateway holds the reap lock.
    fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<pb::Presence>>> {
        let locked: Option<String> = self.query(
            redis::cmd("SET")
                .arg(reap_lock_key(dead_gateway_id))
                .arg(reaper_id)
                .arg("NX")
                .arg("EX")
                .arg(60),
        )?;
        if locked.is_none() {
            return Ok(None);
        }
        let changes = self.reap_sessions_of(dead_gateway_id, now_ms, true)?;
        self.query::<()>(redis::cmd("SREM").arg(KNOWN_GATEWAYS).arg(dead_gateway_id))?;
        Ok(Some(changes))
    }

    /// One round trip: `SADD` to the known gateways (1: it had been
    /// forgotten) and the lease. A reap removes the sessions before it
    /// forgets the gateway, so a 1 here comes after that removal: sessions
    /// opened again from now on stay. Then (a second round trip, only after
    /// a reap) the finished reap's lock goes, so a real death within its
    /// 60 s is reaped at once.
    fn rejoin_if_forgotten(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let replies = self.pipeline(vec![
            redis::cmd("SADD")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
            renew_lease_cmd(gateway_id, lease_ttl, now_ms),
        ])?;
        let added: i64 = from_value(replies.into_iter().next().unwrap_or(Value::Nil))?;
        // Best effort: the rejoin itself must be reported whatever happens
        // here (a lock left behind only delays a later reap by its 60 s).
        if added == 1 {
            if let Err(e) = self.query::<()>(redis::cmd("DEL").arg(reap_lock_key(gateway_id))) {
                tracing::warn!(gateway = gateway_id, "reap lock not removed: {e}");
            }
        }
        Ok(added == 1)
    }

    /// Clean shutdown of a gateway: its lease and registration go, its
    /// remaining sessions are removed; returns who went offline.
    fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        let changes = self.reap_sessions_of(gateway_id, now_ms, false)?;
        self.pipeline(vec![
            redis::cmd("DEL").arg(lease_key(gateway_id)).clone(),
            redis::cmd("SREM")
                .arg(KNOWN_GATEWAYS)
                .arg(gateway_id)
                .clone(),
        ])?;
        Ok(changes)
    }
}

impl RedisStore {
    /// Removes every session registered on `gateway_id` (pipelined);
    /// returns who went offline. A `dead` gateway's sessions did not count,
    /// so a user goes offline through it only with their last session;
    /// otherwise (judged by its lease) as in a batch of closes.
    fn reap_sessions_of(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
        dead: bool,
    ) -> StoreResult<Vec<pb::Presence>> {
        let conns_key = gateway_conns_key(gateway_id);
        let conns: HashMap<u64, String> = self.query(redis::cmd("HGETALL").arg(&conns_key))?;
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        let dead = dead
            || !self
                .dead_gateways_among(&HashSet::from([Arc::from(gateway_id)]))?
                .is_empty();
        let live_gateway = if dead { "" } else { gateway_id };
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
                        gateway_id: gateway_id.into(),
                        conn,
                    },
                },
                at_ms: now_ms,
            });
        }
        let mut verdicts = Vec::with_capacity(sessions.len());
        let mut check = HashSet::new();
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
                            live_gateway.as_bytes(),
                        ],
                    ));
                }
            }
            for reply in self.pipeline(cmds)? {
                verdicts.push(Verdict::of_close(reply, &mut check)?);
            }
        }
        let dead_elsewhere = self.dead_gateways_among(&check)?;
        let changes = sessions
            .iter()
            .zip(verdicts)
            .filter(|(_, verdict)| verdict.holds(&dead_elsewhere))
            .map(|(change, _)| offline_presence(&change.session().user_id, now_ms))
            .collect();
        self.query::<()>(redis::cmd("DEL").arg(&conns_key))?;
        Ok(changes)
    }

    /// PUBLISH one encoded presence batch.
    pub fn publish_presence(&mut self, payload: &[u8]) -> StoreResult<()> {
        self.query::<i64>(redis::cmd("PUBLISH").arg(PRESENCE_CHANNEL).arg(payload))
            .map(|_| ())
    }
}

/// `SET` of a gateway's lease: alive for `lease_ttl` from now.
pub(super) fn renew_lease_cmd(gateway_id: &str, lease_ttl: Duration, now_ms: i64) -> redis::Cmd {
    redis::cmd("SET")
        .arg(lease_key(gateway_id))
        .arg(now_ms)
        .arg("PX")
        .arg(lease_ttl.as_millis() as u64)
        .clone()
}
