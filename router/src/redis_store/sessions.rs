//! `impl SessionStore for RedisStore`: the batched session writes (one
//! pipeline per gateway per flush, plus one lease read when a user has
//! sessions on other gateways), last seen, and the session and presence
//! reads (sessions on dead gateways left out).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use palaver_protocol::pb;
use redis::Value;

use crate::api::{Session, SessionAddr};
use crate::store::{
    SessionChange, SessionStore, SessionsApplied, StoreResult, UserPresence, UserSessions,
};

use super::gateways::offline_presence;
use super::gateways::renew_lease_cmd;
use super::keys::{decode_addr, encode_addr, gateway_conns_key, user_key};
use super::{corrupt, from_value, RedisStore};

/// Whether a session change moved the user's presence, as the scripts
/// answer it: sessions on dead gateways do not count, and the gateways'
/// leases are in another slot than the user's keys, so a script can only
/// name the gateways to judge.
pub(super) enum Verdict {
    Yes,
    No,
    /// Yes iff every one of these gateways is dead.
    IfAllDead(Vec<Arc<str>>),
}

impl Verdict {
    /// The gateways of the addresses a script returned.
    fn gateways_of(addrs: &[String]) -> Vec<Arc<str>> {
        addrs
            .iter()
            .filter_map(|a| decode_addr(a))
            .map(|a| a.gateway_id)
            .collect()
    }

    /// Yes iff all of `gateways`, none known to be alive, turn out dead.
    fn if_all_dead(gateways: Vec<Arc<str>>, check: &mut HashSet<Arc<str>>) -> Self {
        check.extend(gateways.iter().cloned());
        Verdict::IfAllDead(gateways)
    }

    /// From the addresses `open_session.lua` found before the open (on
    /// `gateway_id`, the flushing gateway, which is alive): came online
    /// iff none of them counts.
    pub(super) fn of_open(
        before: &[String],
        gateway_id: &str,
        check: &mut HashSet<Arc<str>>,
    ) -> Self {
        if before.is_empty() {
            return Verdict::Yes;
        }
        let gateways = Self::gateways_of(before);
        if gateways.iter().any(|g| **g == *gateway_id) {
            return Verdict::No;
        }
        Self::if_all_dead(gateways, check)
    }

    /// From a `close_session.lua` reply: offline now, still online, or
    /// offline iff the gateways of the sessions left are all dead.
    pub(super) fn of_close(reply: Value, check: &mut HashSet<Arc<str>>) -> StoreResult<Self> {
        let (_removed, offline, rest): (i64, i64, Vec<String>) = from_value(reply)?;
        Ok(if offline == 1 {
            Verdict::Yes
        } else if rest.is_empty() {
            Verdict::No
        } else {
            Self::if_all_dead(Self::gateways_of(&rest), check)
        })
    }

    pub(super) fn holds(&self, dead: &HashSet<Arc<str>>) -> bool {
        match self {
            Verdict::Yes => true,
            Verdict::No => false,
            Verdict::IfAllDead(gateways) => gateways.iter().all(|g| dead.contains(g)),
        }
    }
}

impl SessionStore for RedisStore {
    /// ONE pipeline: renew the lease, register opened sessions, unregister
    /// closed ones (setting last-seen when a user's last session closes),
    /// clear the push-pending marks of users who connected. Commands: 1 + 3
    /// per opened and 2 per closed session. When a changed user has
    /// sessions on other gateways, one more round trip reads those
    /// gateways' leases, for the whole batch at once.
    fn apply_sessions(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<SessionsApplied> {
        let mut cmds = Vec::with_capacity(1 + 3 * changes.len());
        cmds.push(renew_lease_cmd(gateway_id, lease_ttl, now_ms));
        let conns = gateway_conns_key(gateway_id);
        for change in changes {
            match change {
                SessionChange::Opened(s) | SessionChange::Reopened(s) => {
                    let addr = encode_addr(&s.addr);
                    let reopen: &[u8] = match change {
                        SessionChange::Reopened(_) => b"1",
                        _ => b"0",
                    };
                    cmds.push(Self::evalsha(
                        &self.scripts.open_session,
                        &[&user_key(&s.user_id, "sess"), &user_key(&s.user_id, "seen")],
                        &[s.device_id.as_bytes(), addr.as_bytes(), reopen],
                    ));
                    // Also for a reopen the script refuses: that connection
                    // is replaced, and its close removes the entry.
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
                            // This gateway just renewed its lease: alive.
                            gateway_id.as_bytes(),
                        ],
                    ));
                    cmds.push(redis::cmd("HDEL").arg(&conns).arg(s.addr.conn).clone());
                }
            }
        }
        let replies = self.pipeline(cmds)?;
        let mut replies = replies.into_iter().skip(1);
        let mut result = SessionsApplied::default();
        let mut verdicts = Vec::with_capacity(changes.len());
        let mut check = HashSet::new();
        for change in changes {
            match change {
                SessionChange::Opened(s) | SessionChange::Reopened(s) => {
                    let (prev, before, recorded): (String, Vec<String>, i64) =
                        from_value(replies.next().unwrap_or(Value::Nil))?;
                    replies.next();
                    replies.next();
                    let prev = if prev.is_empty() {
                        None
                    } else {
                        decode_addr(&prev)
                    };
                    if matches!(change, SessionChange::Opened(_)) && recorded == 1 {
                        // The user's other devices' sessions, for the
                        // account cap (SPEC §4); `before` holds this
                        // device's previous address too.
                        let beside: Vec<Arc<str>> = before
                            .iter()
                            .filter_map(|a| decode_addr(a))
                            .filter(|a| Some(a) != prev.as_ref() && *a != s.addr)
                            .map(|a| a.gateway_id)
                            .collect();
                        if !beside.is_empty() {
                            result.opened_beside.push((s.addr.clone(), beside));
                        }
                    }
                    match prev.filter(|p| *p != s.addr) {
                        // A refused reopen: the holder is newer.
                        Some(holder) if recorded == 0 => {
                            let by = Session {
                                addr: holder,
                                ..s.clone()
                            };
                            result.replaced.push((by, s.addr.clone()));
                            verdicts.push(Verdict::No);
                            continue;
                        }
                        Some(prev) => result.replaced.push((s.clone(), prev)),
                        None => {}
                    }
                    verdicts.push(Verdict::of_open(&before, gateway_id, &mut check));
                }
                SessionChange::Closed { .. } => {
                    let reply = replies.next().unwrap_or(Value::Nil);
                    replies.next();
                    verdicts.push(Verdict::of_close(reply, &mut check)?);
                }
            }
        }
        let dead = self.dead_gateways_among(&check)?;
        for (change, verdict) in changes.iter().zip(verdicts) {
            if !verdict.holds(&dead) {
                continue;
            }
            result.presence.push(match change {
                SessionChange::Opened(s) | SessionChange::Reopened(s) => pb::Presence {
                    user_id: s.user_id.clone(),
                    online: true,
                    last_seen_ms: 0,
                },
                SessionChange::Closed { session: s, at_ms } => offline_presence(&s.user_id, *at_ms),
            });
        }
        Ok(result)
    }

    fn sessions_of_users<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<UserSessions> {
        let sessions = self.raw_sessions(user_ids)?;
        let gateways: HashSet<Arc<str>> = sessions
            .iter()
            .flatten()
            .map(|addr| addr.gateway_id.clone())
            .collect();
        let dead = self.dead_gateways_among(&gateways)?;
        let mut live = UserSessions::with_capacity(sessions.len());
        for addrs in sessions {
            live.push_user(
                addrs
                    .into_iter()
                    .filter(|addr| !dead.contains(&addr.gateway_id)),
            );
        }
        Ok(live)
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
}

impl RedisStore {
    /// Every session of each user, ascending by device id, dead gateways
    /// included.
    fn raw_sessions(&mut self, user_ids: &[impl AsRef<str>]) -> StoreResult<Vec<Vec<SessionAddr>>> {
        let cmds = user_ids
            .iter()
            .map(|u| {
                redis::cmd("HGETALL")
                    .arg(user_key(u.as_ref(), "sess"))
                    .clone()
            })
            .collect();
        let replies = self.pipeline(cmds)?;
        replies
            .into_iter()
            .map(|v| {
                let map: HashMap<String, String> = from_value(v)?;
                let mut sessions: Vec<(String, SessionAddr)> = map
                    .into_iter()
                    .map(|(device_id, addr)| {
                        decode_addr(&addr)
                            .map(|addr| (device_id, addr))
                            .ok_or_else(|| corrupt(format!("session address {addr:?}")))
                    })
                    .collect::<StoreResult<_>>()?;
                sessions.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(sessions.into_iter().map(|(_, addr)| addr).collect())
            })
            .collect()
    }
}
