//! Presence watches: which connections watch which users.
//!
//! A watch belongs to its connection (SPEC §10: dropped when the connection
//! closes or is replaced), so it lives in memory next to the connection, on
//! the gateway side of the backend, never in the store. Both backends use
//! this one table: the embedded engine for every gateway attached to it,
//! the Kafka/Redis bridge for its own gateway.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::api::{Session, SessionAddr};

/// Watching connections → watched users, and the reverse index, per
/// gateway (connection keys are only unique within one gateway).
#[derive(Debug, Default)]
pub struct Watches {
    gateways: HashMap<Arc<str>, GatewayWatches>,
}

#[derive(Debug, Default)]
struct GatewayWatches {
    by_user: HashMap<String, HashSet<u64>>,
    by_conn: HashMap<u64, ConnWatches>,
}

#[derive(Debug)]
struct ConnWatches {
    /// The connection's user, for the visibility rule at event time.
    user_id: String,
    watched: HashSet<String>,
}

/// One connection watching a user, with the connection's user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watcher {
    pub addr: SessionAddr,
    pub user_id: String,
}

impl Watches {
    /// Lets `watcher`'s connection watch `users`, all or nothing:
    /// `Err(currently watched)` if it would watch more than `max` distinct
    /// users. Returns the users newly watched (so a caller can take them
    /// back if it fails later).
    pub fn add(
        &mut self,
        watcher: &Session,
        users: &[String],
        max: usize,
    ) -> Result<Vec<String>, usize> {
        let gateway = self.gateways.get(&watcher.addr.gateway_id);
        let current = gateway.and_then(|g| g.by_conn.get(&watcher.addr.conn));
        let count = current.map_or(0, |c| c.watched.len());
        let mut new: Vec<String> = users
            .iter()
            .filter(|u| !current.is_some_and(|c| c.watched.contains(*u)))
            .cloned()
            .collect();
        new.sort();
        new.dedup();
        if count + new.len() > max {
            return Err(count);
        }
        if new.is_empty() {
            return Ok(new);
        }
        let gateway = self
            .gateways
            .entry(watcher.addr.gateway_id.clone())
            .or_default();
        for user in &new {
            gateway
                .by_user
                .entry(user.clone())
                .or_default()
                .insert(watcher.addr.conn);
        }
        gateway
            .by_conn
            .entry(watcher.addr.conn)
            .or_insert_with(|| ConnWatches {
                user_id: watcher.user_id.clone(),
                watched: HashSet::new(),
            })
            .watched
            .extend(new.iter().cloned());
        Ok(new)
    }

    /// Stops `watcher` watching these users (idempotent).
    pub fn remove(&mut self, watcher: &SessionAddr, users: &[String]) {
        let Some(gateway) = self.gateways.get_mut(&watcher.gateway_id) else {
            return;
        };
        if let Some(conn) = gateway.by_conn.get_mut(&watcher.conn) {
            for user in users {
                if conn.watched.remove(user) {
                    unlink(&mut gateway.by_user, user, watcher.conn);
                }
            }
            if conn.watched.is_empty() {
                gateway.by_conn.remove(&watcher.conn);
            }
        }
        if gateway.by_conn.is_empty() {
            self.gateways.remove(&watcher.gateway_id);
        }
    }

    /// Drops every watch of a connection (it closed or was replaced).
    pub fn drop_conn(&mut self, watcher: &SessionAddr) {
        let Some(gateway) = self.gateways.get_mut(&watcher.gateway_id) else {
            return;
        };
        if let Some(conn) = gateway.by_conn.remove(&watcher.conn) {
            for user in &conn.watched {
                unlink(&mut gateway.by_user, user, watcher.conn);
            }
        }
        if gateway.by_conn.is_empty() {
            self.gateways.remove(&watcher.gateway_id);
        }
    }

    /// Every connection watching `user_id`, any order.
    pub fn watchers_of(&self, user_id: &str) -> Vec<Watcher> {
        let mut watchers = Vec::new();
        for (gateway_id, gateway) in &self.gateways {
            for conn in gateway.by_user.get(user_id).into_iter().flatten() {
                if let Some(watching) = gateway.by_conn.get(conn) {
                    watchers.push(Watcher {
                        addr: SessionAddr {
                            gateway_id: gateway_id.clone(),
                            conn: *conn,
                        },
                        user_id: watching.user_id.clone(),
                    });
                }
            }
        }
        watchers
    }

    /// How many distinct users the connection watches.
    pub fn watching(&self, watcher: &SessionAddr) -> usize {
        self.gateways
            .get(&watcher.gateway_id)
            .and_then(|g| g.by_conn.get(&watcher.conn))
            .map_or(0, |c| c.watched.len())
    }
}

fn unlink(by_user: &mut HashMap<String, HashSet<u64>>, user: &str, conn: u64) {
    if let Some(set) = by_user.get_mut(user) {
        set.remove(&conn);
        if set.is_empty() {
            by_user.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, gateway: &str, conn: u64) -> Session {
        Session {
            user_id: user.into(),
            device_id: "d".into(),
            addr: SessionAddr {
                gateway_id: gateway.into(),
                conn,
            },
        }
    }

    fn conns(w: &Watches, user: &str) -> Vec<(String, u64)> {
        let mut c: Vec<(String, u64)> = w
            .watchers_of(user)
            .into_iter()
            .map(|w| (w.addr.gateway_id.to_string(), w.addr.conn))
            .collect();
        c.sort();
        c
    }

    #[test]
    fn watches_are_all_or_nothing_and_dropped_with_the_connection() {
        let mut w = Watches::default();
        let users = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let one = session("u1", "g", 1);
        let two = session("u2", "g", 2);
        assert_eq!(
            w.add(&one, &users(&["a", "b", "a"]), 2),
            Ok(users(&["a", "b"]))
        );
        assert_eq!(w.add(&one, &users(&["c"]), 2), Err(2));
        assert_eq!(w.add(&one, &users(&["a"]), 2), Ok(vec![]));
        assert_eq!(w.add(&two, &users(&["a"]), 2), Ok(users(&["a"])));
        assert_eq!(conns(&w, "a"), [("g".into(), 1), ("g".into(), 2)]);
        assert_eq!(w.watchers_of("b")[0].user_id, "u1");
        w.drop_conn(&one.addr);
        assert_eq!(conns(&w, "a"), [("g".into(), 2)]);
        assert!(conns(&w, "b").is_empty());
        w.remove(&two.addr, &users(&["a"]));
        assert!(conns(&w, "a").is_empty());
        assert!(w.gateways.is_empty(), "nothing left behind");
    }

    /// The same connection key on two gateways is two connections.
    #[test]
    fn connections_of_different_gateways_do_not_mix() {
        let mut w = Watches::default();
        let bob = vec!["bob".to_string()];
        w.add(&session("u1", "g1", 7), &bob, 10).unwrap();
        w.add(&session("u2", "g2", 7), &bob, 10).unwrap();
        w.drop_conn(&session("u1", "g1", 7).addr);
        assert_eq!(conns(&w, "bob"), [("g2".into(), 7)]);
        assert_eq!(w.watchers_of("bob")[0].user_id, "u2");
    }
}
