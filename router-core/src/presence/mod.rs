//! Presence, sessions and watches, written once for both backends.
//!
//! - Session changes (a connection completed Hello / closed) are queued by
//!   whoever hosts the gateway and applied in batches through
//!   [`apply_session_changes`]: one [`SessionStore::apply_sessions`] per
//!   gateway per batch (one Redis pipeline), the closed and replaced
//!   connections' watches dropped, `GoAway(REPLACED)` ([`replaced_goaway`])
//!   for every replaced connection. The embedded engine applies them once
//!   per engine batch, the Kafka/Redis bridge once per flush interval.
//! - Watches ([`Watches`]) are connection state, so they live in memory with
//!   the gateway, shared between the request path (PresenceSubscribe,
//!   `Router::presence_subscribe`) and the fan-out.
//! - [`fan_out`] turns presence changes into `PresenceEvent` frames for the
//!   local watchers allowed to see them (`logic::presence_visible`,
//!   SPEC §10, checked once per distinct watching user with bounded work):
//!   the embedded engine calls it right after applying, the bridge's
//!   subscriber thread after Redis pub/sub brings every gateway's changes.

mod watches;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_protocol::pb::{self, frame::Body};

use crate::api::SessionAddr;
use crate::bus::Addressed;
use crate::logic::{presence_visible, PresenceVisibility};
use crate::store::{SessionChange, SessionStore, StoreResult, UserStore};

pub use watches::{Watcher, Watches};

/// The watches of a gateway's connections (or of every gateway attached to
/// an embedded engine), shared by the threads that read and write them.
pub type SharedWatches = Arc<Mutex<Watches>>;

/// Locks the watches; a panic elsewhere while holding the lock leaves the
/// table consistent (every method finishes its update before returning),
/// so a poisoned lock is used anyway.
pub fn lock(watches: &Mutex<Watches>) -> std::sync::MutexGuard<'_, Watches> {
    watches.lock().unwrap_or_else(|e| e.into_inner())
}

/// The one `GoAway(REPLACED)`: sent to a connection whose (user, device)
/// connected again on another connection (SPEC §4).
pub fn replaced_goaway() -> pb::Frame {
    pb::Frame {
        request_id: 0,
        body: Some(Body::GoAway(pb::GoAway {
            reason: pb::GoAwayReason::Replaced as i32,
            reconnect_delay_ms: 0,
            message: "this device connected again on another connection".into(),
        })),
    }
}

/// What applying one gateway's session changes produced.
#[derive(Debug, Default)]
pub struct SessionEffects {
    /// `GoAway(REPLACED)` for every replaced connection, wherever it is.
    pub goaways: Vec<Addressed>,
    /// Users who came online or went offline, for [`fan_out`].
    pub presence: Vec<pb::Presence>,
    /// Sessions opened beside the user's other devices' sessions, with
    /// those sessions' gateways
    /// ([`SessionsApplied::opened_beside`](crate::store::SessionsApplied::opened_beside)).
    pub opened_beside: Vec<(SessionAddr, Vec<Arc<str>>)>,
}

/// The one session-change path: drops the watches of the connections that
/// closed, writes the changes and renews the gateway's lease in one store
/// call, drops the watches of replaced connections and addresses a
/// `GoAway(REPLACED)` to each.
///
/// A closed connection's watches go before the write so no event of this
/// batch reaches it; a replaced one keeps its watches until now, which is
/// when it is known to be replaced (its own close comes later).
pub fn apply_session_changes<S: SessionStore + ?Sized>(
    store: &mut S,
    watches: &Mutex<Watches>,
    gateway_id: &str,
    lease_ttl: Duration,
    now_ms: i64,
    changes: &[SessionChange],
) -> StoreResult<SessionEffects> {
    {
        let mut watches = lock(watches);
        for change in changes {
            if let SessionChange::Closed { session, .. } = change {
                watches.drop_conn(&session.addr);
            }
        }
    }
    let applied = store.apply_sessions(gateway_id, lease_ttl, now_ms, changes)?;
    let mut effects = SessionEffects {
        goaways: Vec::with_capacity(applied.replaced.len()),
        presence: applied.presence,
        opened_beside: applied.opened_beside,
    };
    if !applied.replaced.is_empty() {
        let mut watches = lock(watches);
        for (_, old) in applied.replaced {
            watches.drop_conn(&old);
            effects.goaways.push(Addressed {
                to: old,
                frame: replaced_goaway(),
                answers_request: false,
            });
        }
    }
    Ok(effects)
}

/// The one presence fan-out: a `PresenceEvent` for each local watcher of
/// each changed user who may see that user (the visibility rule at event
/// time). Visibility is checked once per distinct watching USER, however
/// many of its connections watch, all of the batch's checks in one store
/// call, each bounded by the watcher's own groups and never reading the
/// changed user's conversations ([`crate::store::UserStore::presence_links`]):
/// a change costs the same whether the changed user is in ten
/// conversations or ten thousand. A check that fails drops this batch's
/// events (fail closed; a watcher can query again).
pub fn fan_out<S: UserStore + ?Sized>(
    store: &mut S,
    visibility: PresenceVisibility,
    watches: &Mutex<Watches>,
    changes: &[pb::Presence],
) -> Vec<Addressed> {
    // The lock is not held across the store call below.
    let watched: Vec<(&pb::Presence, Vec<Watcher>)> = {
        let watches = lock(watches);
        changes
            .iter()
            .map(|p| (p, watches.watchers_of(&p.user_id)))
            .filter(|(_, watchers)| !watchers.is_empty())
            .collect()
    };
    if watched.is_empty() {
        return Vec::new();
    }
    // (watcher user, changed user), each pair once.
    let mut pairs: Vec<(&str, &str)> = watched
        .iter()
        .flat_map(|(p, watchers)| {
            watchers
                .iter()
                .map(|w| (w.user_id.as_str(), p.user_id.as_str()))
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let visible = match presence_visible(store, visibility, &pairs) {
        Ok(visible) => visible,
        Err(e) => {
            tracing::warn!(
                "{} presence events dropped, visibility check failed: {e}",
                watched.len()
            );
            return Vec::new();
        }
    };
    let mut frames = Vec::new();
    for (presence, watchers) in &watched {
        let frame = pb::Frame {
            request_id: 0,
            body: Some(Body::PresenceEvent(pb::PresenceEvent {
                presence: Some((*presence).clone()),
            })),
        };
        for watcher in watchers {
            let pair = (watcher.user_id.as_str(), presence.user_id.as_str());
            let allowed = pairs
                .binary_search(&pair)
                .is_ok_and(|i| visible.get(i).copied().unwrap_or(false));
            if allowed {
                frames.push(Addressed {
                    to: watcher.addr.clone(),
                    frame: frame.clone(),
                    answers_request: false,
                });
            }
        }
    }
    frames
}
