//! Presence: the visibility rule ([`presence_visible`]), PresenceQuery,
//! PresenceSubscribe (watches), and the presence effects of a session
//! opening or closing.

use std::collections::HashSet;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};

use super::{event, reject, reply, Failure, Router};
use crate::api::{Inbound, Session};
use crate::bus::{Addressed, Output};
use crate::store::{Store, StoreResult, UserPresence, UserStore, WatchAdd};

/// Whose presence and last seen a user may see (SPEC §10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PresenceVisibility {
    /// Only users sharing a conversation (DIRECT or GROUP, current member)
    /// with the asker, and the asker themself. Everyone else looks like a
    /// user who was never seen.
    #[default]
    SharedConversation,
    /// Every user sees every user.
    Everyone,
}

impl PresenceVisibility {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SharedConversation => "shared_conversation",
            Self::Everyone => "everyone",
        }
    }
}

impl std::fmt::Display for PresenceVisibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PresenceVisibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shared_conversation" => Ok(Self::SharedConversation),
            "everyone" => Ok(Self::Everyone),
            other => Err(format!(
                "unknown presence visibility {other:?}: expected shared_conversation or everyone"
            )),
        }
    }
}

/// The presence visibility rule, the one implementation every backend uses:
/// for each of `others`, in input order, whether `user_id` may see its
/// presence. Under [`PresenceVisibility::SharedConversation`] the relation
/// is symmetric (a user always sees themself), so a fan-out can ask it once
/// per changed user with all of that user's watchers as `others`.
pub fn presence_visible<S: UserStore + ?Sized>(
    store: &mut S,
    visibility: PresenceVisibility,
    user_id: &str,
    others: &[String],
) -> StoreResult<Vec<bool>> {
    if visibility == PresenceVisibility::Everyone {
        return Ok(vec![true; others.len()]);
    }
    let strangers: Vec<String> = others.iter().filter(|o| *o != user_id).cloned().collect();
    let mut shared = store.shares_conversation(user_id, &strangers)?.into_iter();
    Ok(others
        .iter()
        .map(|o| o == user_id || shared.next().unwrap_or(false))
        .collect())
}

impl<S: Store> Router<S> {
    // ---- Presence ------------------------------------------------------

    pub(super) fn presence_users(&self, user_ids: &[String]) -> Result<Vec<String>, Failure> {
        if user_ids.len() > self.config.max_presence_users {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "{} user ids in one request, the limit is {}",
                    user_ids.len(),
                    self.config.max_presence_users
                ),
            );
        }
        let mut seen = HashSet::new();
        let mut unique = Vec::with_capacity(user_ids.len());
        for user_id in user_ids {
            self.check_user_id(user_id)?;
            if seen.insert(user_id.as_str()) {
                unique.push(user_id.clone());
            }
        }
        Ok(unique)
    }

    /// The users' presence as `asker` may see it: a user `asker` may not see
    /// is answered exactly like a user who was never seen.
    pub(super) fn presence_result(
        &mut self,
        asker: &str,
        user_ids: Vec<String>,
    ) -> Result<pb::PresenceResult, Failure> {
        let visible = presence_visible(
            &mut self.store,
            self.config.presence_visibility,
            asker,
            &user_ids,
        )?;
        let shown: Vec<String> = user_ids
            .iter()
            .zip(&visible)
            .filter(|(_, v)| **v)
            .map(|(u, _)| u.clone())
            .collect();
        let mut states = self.store.presence_of_users(&shown)?.into_iter();
        Ok(pb::PresenceResult {
            presences: user_ids
                .into_iter()
                .zip(visible)
                .map(|(user_id, visible)| {
                    let state = if visible {
                        states.next().unwrap_or_default()
                    } else {
                        UserPresence::default()
                    };
                    (user_id, state)
                })
                .map(|(user_id, state)| pb::Presence {
                    user_id,
                    online: state.online,
                    last_seen_ms: state.last_seen_ms,
                })
                .collect(),
        })
    }

    pub(super) fn presence_query(
        &mut self,
        req: &Inbound,
        query: &pb::PresenceQuery,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let users = self.presence_users(&query.user_ids)?;
        let result = self.presence_result(&req.from.user_id, users)?;
        out.frames.push(reply(req, Body::PresenceResult(result)));
        Ok(())
    }

    pub(super) fn presence_subscribe(
        &mut self,
        req: &Inbound,
        subscribe: &pb::PresenceSubscribe,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let users = self.presence_users(&subscribe.user_ids)?;
        if subscribe.unsubscribe {
            self.store.remove_watches(&req.from.addr, &users)?;
            out.frames.push(reply(
                req,
                Body::PresenceResult(pb::PresenceResult::default()),
            ));
            return Ok(());
        }
        let max = self.config.max_watches_per_connection;
        if let WatchAdd::LimitExceeded { watching } =
            self.store.add_watches(&req.from.addr, &users, max)?
        {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "a connection may watch at most {max} users; it watches {watching}, \
                     unsubscribe some first"
                ),
            );
        }
        // Every requested user is watched, visible or not: visibility is
        // checked when an event is sent, so a user who becomes visible later
        // (a shared conversation appears) starts producing events, and one
        // who stops being visible stops.
        self.watcher_users
            .insert(req.from.addr.clone(), req.from.user_id.clone());
        let result = self.presence_result(&req.from.user_id, users)?;
        out.frames.push(reply(req, Body::PresenceResult(result)));
        Ok(())
    }

    pub(super) fn presence_changed(
        &mut self,
        user_id: &str,
        online: bool,
        last_seen_ms: i64,
        out: &mut Output,
    ) -> StoreResult<()> {
        let watchers = self.store.watchers_of(user_id)?;
        if watchers.is_empty() {
            return Ok(());
        }
        // Visibility at event time. A watch whose connection's user this
        // router does not know (added by another router) gets nothing: fail
        // closed.
        let watcher_users: Vec<String> = watchers
            .iter()
            .map(|w| self.watcher_users.get(w).cloned().unwrap_or_default())
            .collect();
        let visible = presence_visible(
            &mut self.store,
            self.config.presence_visibility,
            user_id,
            &watcher_users,
        )?;
        let frame = event(Body::PresenceEvent(pb::PresenceEvent {
            presence: Some(pb::Presence {
                user_id: user_id.to_owned(),
                online,
                last_seen_ms,
            }),
        }));
        for ((to, watcher), visible) in watchers.into_iter().zip(&watcher_users).zip(visible) {
            if visible && !watcher.is_empty() {
                out.frames.push(Addressed {
                    to,
                    frame: frame.clone(),
                });
            }
        }
        Ok(())
    }

    pub(super) fn session_opened(
        &mut self,
        session: &Session,
        out: &mut Output,
    ) -> StoreResult<()> {
        let opened = self.store.open_session(session)?;
        if let Some(old) = opened.replaced {
            // The old connection is closed by its gateway; it watches nothing
            // from now on.
            self.store.drop_watches(&old)?;
            self.watcher_users.remove(&old);
            out.frames.push(Addressed {
                to: old,
                frame: event(Body::GoAway(pb::GoAway {
                    reason: pb::GoAwayReason::Replaced as i32,
                    reconnect_delay_ms: 0,
                    message: "this device connected again on another connection".into(),
                })),
            });
        }
        self.store.clear_push_pending(&session.user_id, None)?;
        if opened.came_online {
            self.presence_changed(&session.user_id, true, 0, out)?;
        }
        Ok(())
    }

    pub(super) fn session_closed(
        &mut self,
        session: &Session,
        at_ms: i64,
        out: &mut Output,
    ) -> StoreResult<()> {
        self.store.drop_watches(&session.addr)?;
        self.watcher_users.remove(&session.addr);
        let closed = self.store.close_session(session, at_ms)?;
        if closed.went_offline {
            self.presence_changed(&session.user_id, false, at_ms, out)?;
        }
        Ok(())
    }
}
