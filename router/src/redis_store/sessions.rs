//! `impl SessionStore for RedisStore`: device sessions, last seen, presence
//! reads and presence watches.

use std::collections::{HashMap, HashSet};

use redis::Value;

use crate::api::{Session, SessionAddr};
use crate::store::{
    DeviceSession, SessionClosed, SessionOpened, SessionStore, StoreResult, UserPresence, WatchAdd,
};

use super::keys::{decode_addr, encode_addr, gateway_conns_key, user_key, watcher_key};
use super::{corrupt, from_value, RedisStore};

impl SessionStore for RedisStore {
    fn open_session(&mut self, session: &Session) -> StoreResult<SessionOpened> {
        let keys = [
            user_key(&session.user_id, "sess"),
            user_key(&session.user_id, "seen"),
        ];
        let addr = encode_addr(&session.addr);
        let (prev, had): (String, i64) = self.with_conn(|conn, scripts| {
            scripts
                .open_session
                .key(&keys[0])
                .key(&keys[1])
                .arg(&session.device_id)
                .arg(&addr)
                .invoke(conn.as_dyn())
        })?;
        self.query::<()>(
            redis::cmd("HSET")
                .arg(gateway_conns_key(&session.addr.gateway_id))
                .arg(session.addr.conn)
                .arg(format!("{}\x1f{}", session.user_id, session.device_id)),
        )?;
        let replaced = if prev.is_empty() {
            None
        } else {
            decode_addr(&prev)
        };
        Ok(SessionOpened {
            replaced: replaced.filter(|p| *p != session.addr),
            came_online: had == 0,
        })
    }

    fn close_session(&mut self, session: &Session, at_ms: i64) -> StoreResult<SessionClosed> {
        let keys = [
            user_key(&session.user_id, "sess"),
            user_key(&session.user_id, "seen"),
        ];
        let addr = encode_addr(&session.addr);
        let (removed, offline): (i64, i64) = self.with_conn(|conn, scripts| {
            scripts
                .close_session
                .key(&keys[0])
                .key(&keys[1])
                .arg(&session.device_id)
                .arg(&addr)
                .arg(at_ms)
                .invoke(conn.as_dyn())
        })?;
        if removed == 1 {
            self.query::<()>(
                redis::cmd("HDEL")
                    .arg(gateway_conns_key(&session.addr.gateway_id))
                    .arg(session.addr.conn),
            )?;
        }
        Ok(SessionClosed {
            removed: removed == 1,
            went_offline: offline == 1,
        })
    }

    fn sessions_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<Vec<DeviceSession>>> {
        let mut sessions = self.raw_sessions(user_ids)?;
        let gateways: HashSet<String> = sessions
            .iter()
            .flatten()
            .map(|s| s.addr.gateway_id.clone())
            .collect();
        let dead = self.dead_gateways_among(&gateways)?;
        if !dead.is_empty() {
            for list in &mut sessions {
                list.retain(|s| !dead.contains(&s.addr.gateway_id));
            }
        }
        Ok(sessions)
    }

    fn presence_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<UserPresence>> {
        let mut cmds = Vec::with_capacity(2 * user_ids.len());
        for u in user_ids {
            cmds.push(redis::cmd("HVALS").arg(user_key(u, "sess")).clone());
            cmds.push(redis::cmd("GET").arg(user_key(u, "seen")).clone());
        }
        let mut replies = self.pipeline(cmds)?.into_iter();
        let mut per_user = Vec::with_capacity(user_ids.len());
        let mut gateways = HashSet::new();
        for _ in user_ids {
            let addrs: Vec<String> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let seen: Option<i64> = from_value(replies.next().unwrap_or(Value::Nil))?;
            let addrs: Vec<SessionAddr> = addrs.iter().filter_map(|a| decode_addr(a)).collect();
            gateways.extend(addrs.iter().map(|a| a.gateway_id.clone()));
            per_user.push((addrs, seen.unwrap_or(0)));
        }
        let dead = self.dead_gateways_among(&gateways)?;
        Ok(per_user
            .into_iter()
            .map(|(addrs, seen)| {
                if addrs.iter().any(|a| !dead.contains(&a.gateway_id)) {
                    UserPresence {
                        online: true,
                        last_seen_ms: 0,
                    }
                } else {
                    UserPresence {
                        online: false,
                        last_seen_ms: seen,
                    }
                }
            })
            .collect())
    }

    fn add_watches(
        &mut self,
        watcher: &SessionAddr,
        user_ids: &[String],
        max: usize,
    ) -> StoreResult<WatchAdd> {
        let key = watcher_key(watcher);
        let (added, watching): (i64, usize) = self.with_conn(|conn, scripts| {
            let mut inv = scripts.add_watches.prepare_invoke();
            inv.key(&key).arg(max);
            for u in user_ids {
                inv.arg(u);
            }
            inv.invoke(conn.as_dyn())
        })?;
        if added == 0 {
            return Ok(WatchAdd::LimitExceeded { watching });
        }
        let addr = encode_addr(watcher);
        let cmds = user_ids
            .iter()
            .map(|u| redis::cmd("SADD").arg(user_key(u, "wb")).arg(&addr).clone())
            .collect();
        self.pipeline(cmds)?;
        Ok(WatchAdd::Added { watching })
    }

    fn remove_watches(&mut self, watcher: &SessionAddr, user_ids: &[String]) -> StoreResult<()> {
        if user_ids.is_empty() {
            return Ok(());
        }
        let addr = encode_addr(watcher);
        let mut cmds = vec![redis::cmd("SREM")
            .arg(watcher_key(watcher))
            .arg(user_ids)
            .clone()];
        cmds.extend(
            user_ids
                .iter()
                .map(|u| redis::cmd("SREM").arg(user_key(u, "wb")).arg(&addr).clone()),
        );
        self.pipeline(cmds).map(|_| ())
    }

    fn drop_watches(&mut self, watcher: &SessionAddr) -> StoreResult<()> {
        let key = watcher_key(watcher);
        let users: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(&key))?;
        let addr = encode_addr(watcher);
        let mut cmds = vec![redis::cmd("DEL").arg(&key).clone()];
        cmds.extend(
            users
                .iter()
                .map(|u| redis::cmd("SREM").arg(user_key(u, "wb")).arg(&addr).clone()),
        );
        self.pipeline(cmds).map(|_| ())
    }

    fn watchers_of(&mut self, user_id: &str) -> StoreResult<Vec<SessionAddr>> {
        let addrs: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(user_key(user_id, "wb")))?;
        addrs
            .iter()
            .map(|a| decode_addr(a).ok_or_else(|| corrupt(format!("watcher address {a:?}"))))
            .collect()
    }
}

impl RedisStore {
    /// Every session of each user, dead gateways included.
    fn raw_sessions(&mut self, user_ids: &[String]) -> StoreResult<Vec<Vec<DeviceSession>>> {
        let cmds = user_ids
            .iter()
            .map(|u| redis::cmd("HGETALL").arg(user_key(u, "sess")).clone())
            .collect();
        let replies = self.pipeline(cmds)?;
        replies
            .into_iter()
            .map(|v| {
                let map: HashMap<String, String> = from_value(v)?;
                let mut sessions: Vec<DeviceSession> = map
                    .into_iter()
                    .map(|(device_id, addr)| {
                        decode_addr(&addr)
                            .map(|addr| DeviceSession { device_id, addr })
                            .ok_or_else(|| corrupt(format!("session address {addr:?}")))
                    })
                    .collect::<StoreResult<_>>()?;
                sessions.sort_by(|a, b| a.device_id.cmp(&b.device_id));
                Ok(sessions)
            })
            .collect()
    }
}
