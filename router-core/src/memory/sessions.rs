//! `SessionStore` and `GatewayRegistry` for the memory store: online
//! devices, last seen, gateway leases and reaping.

use std::time::Duration;

use palaver_protocol::pb;

use crate::api::{Session, SessionAddr};
use crate::logic::Clock;
use crate::store::{
    GatewayRegistry, SessionChange, SessionStore, SessionsApplied, StoreResult, UserPresence,
    UserSessions, UserStore,
};

use super::*;

/// Result of registering one session.
pub(super) struct Opened {
    /// The device's previous address, if it was another one.
    pub(super) replaced: Option<SessionAddr>,
    /// The user had no session on a live gateway before.
    pub(super) came_online: bool,
}

impl MemoryStore {
    /// The address holding `session`'s (user, device), if it is another.
    fn device_held_elsewhere(&self, session: &Session) -> Option<SessionAddr> {
        let user = self.presence.get(session.user_id.as_str())?;
        let i = user
            .devices
            .binary_search_by(|d| (*d.device_id).cmp(&session.device_id))
            .ok()?;
        let holder = &user.devices[i];
        (!holder.is_at(&session.addr)).then(|| holder.addr())
    }

    /// Registers one session, replacing its device's previous one.
    pub(super) fn open_session(&mut self, session: &Session) -> Opened {
        // Sessions on dead gateways do not count, as in every read.
        let came_online = !self.has_live_session(&session.user_id);
        let gateway_id = match self.gateway_ids.get_key_value(&*session.addr.gateway_id) {
            Some((id, _)) => id.clone(),
            None => session.addr.gateway_id.clone(),
        };
        *self.gateway_ids.entry(gateway_id.clone()).or_insert(0) += 1;
        let user = match self.presence.get_mut(session.user_id.as_str()) {
            Some(user) => user,
            None => self
                .presence
                .entry(session.user_id.as_str().into())
                .or_default(),
        };
        let device = DeviceOnline {
            device_id: session.device_id.as_str().into(),
            gateway_id,
            conn: session.addr.conn,
        };
        let previous = match user
            .devices
            .binary_search_by(|d| (*d.device_id).cmp(&session.device_id))
        {
            Ok(i) => Some(std::mem::replace(&mut user.devices[i], device)),
            Err(i) => {
                // Exact growth: one device is the common case, and a Vec's
                // first push would make room for four (+128 B per idle
                // connection).
                user.devices.reserve_exact(1);
                user.devices.insert(i, device);
                None
            }
        };
        if came_online {
            user.last_seen_ms = 0;
        }
        let replaced = previous.and_then(|old| {
            let addr = (!old.is_at(&session.addr)).then(|| old.addr());
            self.release_gateway_id(&old.gateway_id);
            addr
        });
        Opened {
            replaced,
            came_online,
        }
    }

    /// Removes the session if its device is still at its address; true if
    /// the user went offline through that (last seen is then `at_ms`): it
    /// was their last session, or it `counted` (its gateway is alive) and
    /// every session left is on a dead gateway.
    pub(super) fn close_session(&mut self, session: &Session, at_ms: i64, counted: bool) -> bool {
        let Some(user) = self.presence.get_mut(session.user_id.as_str()) else {
            return false;
        };
        let Some(i) = user
            .devices
            .iter()
            .position(|d| *d.device_id == *session.device_id && d.is_at(&session.addr))
        else {
            return false;
        };
        let gone = user.devices.remove(i);
        let last = user.devices.is_empty();
        if last {
            // Give back the allocation: offline users should cost nothing here.
            user.devices = Vec::new();
        }
        self.release_gateway_id(&gone.gateway_id);
        // A session of a dead gateway did not count, so removing it (a reap)
        // changes nothing while the user has another session.
        let went_offline = last || counted && !self.has_live_session(&session.user_id);
        if went_offline {
            if let Some(user) = self.presence.get_mut(session.user_id.as_str()) {
                user.last_seen_ms = at_ms;
            }
        }
        went_offline
    }

    /// Whether the user has a session on a live gateway.
    fn has_live_session(&self, user_id: &str) -> bool {
        let now_ms = self.lease_now_ms();
        self.presence.get(user_id).is_some_and(|user| {
            user.devices
                .iter()
                .any(|d| self.gateway_alive(&d.gateway_id, now_ms))
        })
    }

    /// Whether sessions on `gateway_id` count: a gateway that registered
    /// and whose lease ran out is dead (one that never registered, like the
    /// embedded engine's own, is alive).
    pub(super) fn gateway_alive(&self, gateway_id: &str, now_ms: i64) -> bool {
        // No registered gateway (the embedded engine): no hashing per device.
        self.known_gateways.is_empty()
            || !self.known_gateways.contains(gateway_id)
            || self
                .leases
                .get(gateway_id)
                .is_some_and(|expires_ms| *expires_ms > now_ms)
    }

    /// The store's clock, for lease expiry.
    pub(super) fn now_ms(&self) -> i64 {
        match &self.clock {
            Some(clock) => clock.now_ms(),
            None => crate::logic::SystemClock.now_ms(),
        }
    }

    /// The time leases are judged at; not read when no gateway registered
    /// (the embedded engine's hot path: every fan-out reads sessions).
    pub(super) fn lease_now_ms(&self) -> i64 {
        if self.known_gateways.is_empty() {
            0
        } else {
            self.now_ms()
        }
    }

    /// Removes every session on `gateway_id` (a scan of all users: reaping
    /// is rare, and an index per connection would cost every connection
    /// memory); returns who went offline. `counted`: the gateway is alive,
    /// so its sessions counted until now.
    fn remove_sessions_of(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
        counted: bool,
    ) -> Vec<pb::Presence> {
        let on_gateway: Vec<Session> = self
            .presence
            .iter()
            .flat_map(|(user_id, user)| {
                user.devices
                    .iter()
                    .filter(|d| *d.gateway_id == *gateway_id)
                    .map(|d| Session {
                        user_id: user_id.to_string(),
                        device_id: d.device_id.to_string(),
                        addr: d.addr(),
                    })
            })
            .collect();
        let mut offline = Vec::new();
        for session in on_gateway {
            if self.close_session(&session, now_ms, counted) {
                offline.push(pb::Presence {
                    user_id: session.user_id,
                    online: false,
                    last_seen_ms: now_ms,
                });
            }
        }
        offline
    }
}

impl SessionStore for MemoryStore {
    fn apply_sessions(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        _now_ms: i64,
        changes: &[SessionChange],
    ) -> StoreResult<SessionsApplied> {
        let expires_ms = self.now_ms().saturating_add(lease_ttl.as_millis() as i64);
        match self.leases.get_mut(gateway_id) {
            Some(lease) => *lease = expires_ms,
            None => {
                self.leases.insert(gateway_id.to_owned(), expires_ms);
            }
        }
        let mut applied = SessionsApplied::default();
        for change in changes {
            match change {
                SessionChange::Opened(session) | SessionChange::Reopened(session) => {
                    let held_elsewhere = match change {
                        SessionChange::Reopened(_) => self.device_held_elsewhere(session),
                        _ => None,
                    };
                    if let Some(holder) = held_elsewhere {
                        // The device reconnected elsewhere: this one is older.
                        let by = Session {
                            addr: holder,
                            ..session.clone()
                        };
                        applied.replaced.push((by, session.addr.clone()));
                        continue;
                    }
                    let opened = self.open_session(session);
                    if let Some(old) = opened.replaced {
                        applied.replaced.push((session.clone(), old));
                    }
                    if opened.came_online {
                        applied.presence.push(pb::Presence {
                            user_id: session.user_id.clone(),
                            online: true,
                            last_seen_ms: 0,
                        });
                    }
                    self.clear_push_pending(&session.user_id, None)?;
                }
                SessionChange::Closed { session, at_ms } => {
                    let counted = self.gateway_alive(&session.addr.gateway_id, self.lease_now_ms());
                    if self.close_session(session, *at_ms, counted) {
                        applied.presence.push(pb::Presence {
                            user_id: session.user_id.clone(),
                            online: false,
                            last_seen_ms: *at_ms,
                        });
                    }
                }
            }
        }
        Ok(applied)
    }

    fn sessions_of_users<U: AsRef<str>>(&mut self, user_ids: &[U]) -> StoreResult<UserSessions> {
        let now_ms = self.lease_now_ms();
        let mut sessions = UserSessions::with_capacity(user_ids.len());
        for user_id in user_ids {
            let devices = self
                .presence
                .get(user_id.as_ref())
                .map_or(&[][..], |user| &user.devices);
            sessions.push_user(
                devices
                    .iter()
                    .filter(|d| self.gateway_alive(&d.gateway_id, now_ms))
                    .map(DeviceOnline::addr),
            );
        }
        Ok(sessions)
    }

    fn presence_of_users(&mut self, user_ids: &[String]) -> StoreResult<Vec<UserPresence>> {
        let now_ms = self.lease_now_ms();
        Ok(user_ids
            .iter()
            .map(|user_id| match self.presence.get(user_id.as_str()) {
                None => UserPresence::default(),
                Some(user)
                    if user
                        .devices
                        .iter()
                        .any(|d| self.gateway_alive(&d.gateway_id, now_ms)) =>
                {
                    UserPresence {
                        online: true,
                        last_seen_ms: 0,
                    }
                }
                Some(user) => UserPresence {
                    online: false,
                    last_seen_ms: user.last_seen_ms,
                },
            })
            .collect())
    }
}

impl GatewayRegistry for MemoryStore {
    fn register_gateway(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        let alive = self.gateway_alive(gateway_id, self.lease_now_ms());
        let offline = self.remove_sessions_of(gateway_id, now_ms, alive);
        let expires_ms = self.now_ms().saturating_add(lease_ttl.as_millis() as i64);
        self.leases.insert(gateway_id.to_owned(), expires_ms);
        self.known_gateways.insert(gateway_id.to_owned());
        Ok(offline)
    }

    fn dead_gateways(&mut self) -> StoreResult<Vec<String>> {
        let now_ms = self.now_ms();
        Ok(self
            .known_gateways
            .iter()
            .filter(|g| !self.gateway_alive(g, now_ms))
            .cloned()
            .collect())
    }

    fn reap_gateway(
        &mut self,
        dead_gateway_id: &str,
        _reaper_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<pb::Presence>>> {
        // One thread owns the store: no lock needed, a reaped gateway is
        // simply no longer known.
        if !self.known_gateways.remove(dead_gateway_id) {
            return Ok(None);
        }
        self.leases.remove(dead_gateway_id);
        Ok(Some(self.remove_sessions_of(
            dead_gateway_id,
            now_ms,
            false,
        )))
    }

    fn rejoin_if_forgotten(
        &mut self,
        gateway_id: &str,
        lease_ttl: Duration,
        _now_ms: i64,
    ) -> StoreResult<bool> {
        let expires_ms = self.now_ms().saturating_add(lease_ttl.as_millis() as i64);
        self.leases.insert(gateway_id.to_owned(), expires_ms);
        Ok(self.known_gateways.insert(gateway_id.to_owned()))
    }

    fn deregister_gateway(
        &mut self,
        gateway_id: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<pb::Presence>> {
        let alive = self.gateway_alive(gateway_id, self.lease_now_ms());
        let offline = self.remove_sessions_of(gateway_id, now_ms, alive);
        self.known_gateways.remove(gateway_id);
        self.leases.remove(gateway_id);
        Ok(offline)
    }
}
