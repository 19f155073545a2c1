//! Presence: the visibility rule ([`presence_visible`]), PresenceQuery,
//! PresenceSubscribe (watches), and the session-change path as the
//! embedded engine drives it (the parts both backends share are in
//! [`crate::presence`]).

use std::collections::HashSet;
use std::time::Duration;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};

use super::{reject, reply, Failure, Router};
use crate::api::Inbound;
use crate::bus::Output;
use crate::presence;
use crate::store::{SessionChange, Store, StoreResult, UserPresence, UserStore};

/// Whose presence and last seen a user may see (SPEC §10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PresenceVisibility {
    /// Only users sharing a conversation that counts with the asker (a
    /// DIRECT conversation both have written in, or a GROUP both are current
    /// members of), and the asker themself. Everyone else looks like a user
    /// who was never seen.
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
/// for each `(viewer, target)` pair, in input order, whether `viewer` may
/// see `target`'s presence. Under [`PresenceVisibility::SharedConversation`]
/// a user always sees themself, and otherwise only a user sharing a
/// conversation that counts (SPEC §10: a direct conversation both have
/// written in, or a group both are in; [`UserStore::presence_links`]). The
/// relation is symmetric; the viewer comes first because the work follows
/// the viewer's own groups, never the target's data, so a query costs the
/// same for a hidden user as for an unknown one.
pub fn presence_visible<S: UserStore + ?Sized>(
    store: &mut S,
    visibility: PresenceVisibility,
    pairs: &[(&str, &str)],
) -> StoreResult<Vec<bool>> {
    if visibility == PresenceVisibility::Everyone {
        return Ok(vec![true; pairs.len()]);
    }
    let others: Vec<(&str, &str)> = pairs.iter().copied().filter(|(v, t)| v != t).collect();
    let mut linked = if others.is_empty() {
        Vec::new()
    } else {
        store.presence_links(&others)?
    }
    .into_iter();
    Ok(pairs
        .iter()
        .map(|(v, t)| v == t || linked.next().unwrap_or(false))
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
        let pairs: Vec<(&str, &str)> = user_ids.iter().map(|u| (asker, u.as_str())).collect();
        let visible = presence_visible(&mut self.store, self.config.presence_visibility, &pairs)?;
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

    /// PresenceSubscribe: watches are added to the connection's gateway's
    /// [`crate::presence::Watches`] (all or nothing, capped per connection),
    /// then the users' current state is the answer. Watch first, then read,
    /// so a change between the two is not missed.
    pub(super) fn presence_subscribe(
        &mut self,
        req: &Inbound,
        subscribe: &pb::PresenceSubscribe,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let users = self.presence_users(&subscribe.user_ids)?;
        if subscribe.unsubscribe {
            presence::lock(&self.watches).remove(&req.from.addr, &users);
            out.frames.push(reply(
                req,
                Body::PresenceResult(pb::PresenceResult::default()),
            ));
            return Ok(());
        }
        let max = self.config.max_watches_per_connection;
        // Every requested user is watched, visible or not: visibility is
        // checked when an event is sent, so a user who becomes visible later
        // (a shared conversation appears) starts producing events, and one
        // who stops being visible stops.
        let added = presence::lock(&self.watches).add(&req.from, &users, max);
        let added = match added {
            Ok(added) => added,
            Err(watching) => {
                return reject(
                    ErrorCode::InvalidArgument,
                    format!(
                        "a connection may watch at most {max} users; it watches {watching}, \
                         unsubscribe some first"
                    ),
                )
            }
        };
        match self.presence_result(&req.from.user_id, users) {
            Ok(result) => {
                out.frames.push(reply(req, Body::PresenceResult(result)));
                Ok(())
            }
            Err(failure) => {
                // Not answered: the client retries, so nothing it asked for
                // stays watched.
                presence::lock(&self.watches).remove(&req.from.addr, &added);
                Err(failure)
            }
        }
    }

    /// The one session-change path, as the embedded engine drives it:
    /// `changes` (in order; runs of one gateway written as one batch, which
    /// also renews that gateway's lease by `lease_ttl`), then
    /// `GoAway(REPLACED)` for replaced connections and `PresenceEvent`s for
    /// the watchers of users who came online or went offline.
    pub fn apply_session_changes(
        &mut self,
        changes: &[SessionChange],
        lease_ttl: Duration,
        out: &mut Output,
    ) -> StoreResult<()> {
        let now_ms = self.clock.now_ms();
        for run in
            changes.chunk_by(|a, b| a.session().addr.gateway_id == b.session().addr.gateway_id)
        {
            let gateway_id = &run[0].session().addr.gateway_id;
            let effects = presence::apply_session_changes(
                &mut self.store,
                &self.watches,
                gateway_id,
                lease_ttl,
                now_ms,
                run,
            )?;
            out.frames.extend(effects.goaways);
            out.frames.extend(presence::fan_out(
                &mut self.store,
                self.config.presence_visibility,
                &self.watches,
                &effects.presence,
            ));
        }
        Ok(())
    }
}
