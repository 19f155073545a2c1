//! Conversations: CreateConversation (direct and group) and ChangeMembers
//! (group membership and roles).

use std::collections::{BTreeMap, BTreeSet};

use palaver_protocol::pb::{self, frame::Body, ErrorCode};

use super::{
    direct_info, event, group_info, parse_conversation_id, reject, reply, ConversationRef, Failure,
    Router, RouterConfig,
};
use crate::api::Inbound;
use crate::bus::Output;
use crate::group_id::group_id_for;
use crate::store::{GroupRecord, Membership, QuotaCharge, QuotaOwner, Store};

/// Milliseconds in a UTC day: the add limits count per UTC day.
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

impl<S: Store> Router<S> {
    // ---- Conversations -------------------------------------------------

    pub(super) fn create_conversation(
        &mut self,
        req: &Inbound,
        create: &pb::CreateConversation,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let creator = &req.from.user_id;
        match pb::ConversationKind::try_from(create.kind) {
            Ok(pb::ConversationKind::Direct) => {
                let peers: BTreeSet<&str> =
                    create.member_user_ids.iter().map(String::as_str).collect();
                let peer =
                    match peers.into_iter().collect::<Vec<_>>()[..] {
                        [peer] => peer,
                        _ => return reject(
                            ErrorCode::InvalidArgument,
                            "a direct conversation needs exactly one other user in member_user_ids",
                        ),
                    };
                if peer == creator {
                    return reject(
                        ErrorCode::InvalidArgument,
                        "a direct conversation needs another user, not yourself",
                    );
                }
                self.check_user_id(creator)?;
                self.check_user_id(peer)?;
                let conversation_id = palaver_protocol::direct_conversation_id(creator, peer);
                let users = [creator.clone(), peer.to_owned()];
                self.store
                    .add_conversation_to_users(&conversation_id, &users)?;
                let last_seq = self
                    .store
                    .last_seqs(std::slice::from_ref(&conversation_id))?[0];
                let (a, b) = if creator.as_str() < peer {
                    (creator.as_str(), peer)
                } else {
                    (peer, creator.as_str())
                };
                let info = direct_info(a, b, last_seq);
                out.frames.push(reply(
                    req,
                    Body::ConversationCreated(pb::ConversationCreated {
                        conversation: Some(info),
                    }),
                ));
                Ok(())
            }
            Ok(pb::ConversationKind::Group) => self.create_group(req, create, out),
            Ok(pb::ConversationKind::Channel) => self.create_channel(req, create, out),
            _ => reject(
                ErrorCode::InvalidArgument,
                format!(
                    "conversation kind {} is not DIRECT, GROUP or CHANNEL",
                    create.kind
                ),
            ),
        }
    }

    pub(super) fn create_group(
        &mut self,
        req: &Inbound,
        create: &pb::CreateConversation,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let creator = &req.from.user_id;
        let others = self.check_new_members(creator, create, self.config.max_group_members)?;
        let members = initial_members(creator, others.iter().copied());
        let record = GroupRecord {
            conversation_id: group_id_for(req),
            title: create.title.clone(),
            members,
            created_ms: self.clock.now_ms(),
        };
        // A replay of a create that happened is answered below as it was,
        // before the add limits are checked again.
        let replay =
            self.store.membership(&record.conversation_id, creator)? != Membership::NoSuchGroup;
        if !replay {
            let added: Vec<String> = record
                .members
                .iter()
                .filter(|m| m.user_id != *creator)
                .map(|m| m.user_id.clone())
                .collect();
            self.charge_group_adds(creator, &added, true)?;
        }
        if replay || !self.store.create_group(&record)? {
            // The id follows from the request's identity, so this is a
            // replay of a create that already happened (at-least-once bus):
            // answer it with the group as it was created, create nothing.
            let Some(existing) = self.store.group(&record.conversation_id)? else {
                return reject(ErrorCode::Unavailable, "group creation raced; retry");
            };
            let created = Body::ConversationCreated(pb::ConversationCreated {
                conversation: Some(group_info(existing, 0)),
            });
            out.frames.push(reply(req, created));
            return Ok(());
        }
        let user_ids: Vec<String> = record.members.iter().map(|m| m.user_id.clone()).collect();
        self.store
            .add_conversation_to_users(&record.conversation_id, &user_ids)?;
        let created = Body::ConversationCreated(pb::ConversationCreated {
            conversation: Some(group_info(record, 0)),
        });
        self.reply_and_fan_out(req, created, &user_ids, out)?;
        Ok(())
    }

    pub(super) fn change_members(
        &mut self,
        req: &Inbound,
        change: &pb::ChangeMembers,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &change.conversation_id;
        let actor = &req.from.user_id;
        if let ConversationRef::Direct { .. } = parse_conversation_id(conversation_id)? {
            return reject(
                ErrorCode::InvalidArgument,
                "direct conversations have fixed members",
            );
        }
        let Some(group) = self.store.group(conversation_id)? else {
            return reject(
                ErrorCode::NotFound,
                format!("no conversation {conversation_id}"),
            );
        };
        for user_id in change
            .add_user_ids
            .iter()
            .chain(&change.remove_user_ids)
            .chain(&change.promote_user_ids)
        {
            self.check_user_id(user_id)?;
        }
        let plan = plan_member_change(&group.members, actor, change, &self.config)?;
        let last_seq = self
            .store
            .last_seqs(std::slice::from_ref(conversation_id))?[0];
        let mut recipients: Vec<String> = group.members.iter().map(|m| m.user_id.clone()).collect();
        let changed = Body::MembersChanged(pb::MembersChanged {
            conversation: Some(group_info(
                GroupRecord {
                    members: plan.members_after,
                    ..group
                },
                last_seq,
            )),
            actor_user_id: actor.clone(),
            added_user_ids: plan.added.clone(),
            removed_user_ids: plan.removed.clone(),
        });
        if plan.upsert.is_empty() && plan.removed.is_empty() {
            // Nothing actually changes: tell only the requester.
            out.frames.push(reply(req, changed));
            return Ok(());
        }
        self.charge_membership_change(conversation_id)?;
        self.charge_group_adds(actor, &plan.added, false)?;
        self.store
            .update_members(conversation_id, &plan.upsert, &plan.removed)?;
        self.store
            .add_conversation_to_users(conversation_id, &plan.added)?;
        self.store
            .remove_conversation_from_users(conversation_id, &plan.removed)?;
        // Everyone before and after the change gets the conversation after
        // it (SPEC §11); the group's hourly change limit, charged above,
        // bounds what churn can send a member.
        out.frames.push(reply(req, changed.clone()));
        recipients.extend(plan.added.iter().cloned());
        self.fan_out(&recipients, Some(&req.from.addr), &event(changed), out)?;
        Ok(())
    }

    /// The checks a new group's or channel's request passes (SPEC §14): the
    /// title's length, valid member ids, at most `cap` members with the
    /// creator. Returns the members other than the creator, each once.
    pub(super) fn check_new_members<'a>(
        &self,
        creator: &str,
        create: &'a pb::CreateConversation,
        cap: usize,
    ) -> Result<BTreeSet<&'a str>, Failure> {
        if create.title.len() > self.config.max_title_bytes {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "title is {} bytes, the limit is {}",
                    create.title.len(),
                    self.config.max_title_bytes
                ),
            );
        }
        let mut others = BTreeSet::new();
        for user_id in &create.member_user_ids {
            self.check_user_id(user_id)?;
            if user_id != creator {
                others.insert(user_id.as_str());
            }
        }
        let total = others.len() + 1;
        if total > cap {
            return reject(
                ErrorCode::TooManyMembers,
                format!("{total} members including you, the limit is {cap}"),
            );
        }
        Ok(others)
    }

    /// One change of the group's membership, against its hourly limit
    /// (SPEC §11): every member hears of each change with the whole member
    /// list, so churn is what could flood them. Over the limit:
    /// QUOTA_EXCEEDED, nothing written. Counted before the change is
    /// written (a retry after a store error counts again).
    fn charge_membership_change(&mut self, conversation_id: &str) -> Result<(), Failure> {
        let now_s = self.clock.now_ms().max(0) / 1000;
        let owner = QuotaOwner::MembershipChanges(conversation_id.to_owned());
        let hour = u32::try_from(now_s / i64::from(owner.period_s())).unwrap_or(u32::MAX);
        let limit = self.config.max_membership_changes_per_group_per_hour;
        let granted = self.store.charge_quotas(&[QuotaCharge {
            owner,
            period: hour,
            amount: 1,
            limit,
        }])?;
        if granted.first() == Some(&true) {
            return Ok(());
        }
        reject(
            ErrorCode::QuotaExceeded,
            format!(
                "{conversation_id} changed its members {limit} times this hour, the most a group \
                 may; try again after the hour (UTC)"
            ),
        )
    }

    /// SPEC §11's limits on adding `added` (users other than `adder`, who
    /// joins too when `adder_joins`: a create) to a group, checked before
    /// anything is written, then the adds counted: each user, and the
    /// adder when joining, is in fewer than `max_groups_per_user` groups;
    /// `adder` added each user fewer than `max_group_adds_per_adder_per_day`
    /// times today (UTC); and a user `adder` is a stranger to (no direct
    /// conversation both have written in) was added by strangers fewer
    /// than `max_group_adds_by_strangers_per_day` times today. Any
    /// exceeded: QUOTA_EXCEEDED naming the user, nothing written.
    ///
    /// Counted before the change is written: a store error after this
    /// makes the retry count again (never uncounted adds).
    pub(super) fn charge_group_adds(
        &mut self,
        adder: &str,
        added: &[String],
        adder_joins: bool,
    ) -> Result<(), Failure> {
        let mut joining = added.to_vec();
        if adder_joins {
            joining.push(adder.to_owned());
        }
        if joining.is_empty() {
            return Ok(());
        }
        let max_groups = self.config.max_groups_per_user;
        let counts = self.store.group_counts(&joining)?;
        if let Some((user_id, _)) = joining.iter().zip(&counts).find(|(_, n)| **n >= max_groups) {
            let message = if user_id == adder {
                format!(
                    "you are in {max_groups} groups, the most one user may be in; \
                     leave one first"
                )
            } else {
                format!("{user_id} is in as many groups as one user may be in ({max_groups})")
            };
            return reject(ErrorCode::QuotaExceeded, message);
        }
        if added.is_empty() {
            return Ok(());
        }
        let directs: Vec<String> = added
            .iter()
            .map(|u| palaver_protocol::direct_conversation_id(adder, u))
            .collect();
        let contacts = self.store.written_by_both(&directs)?;
        let day = self.clock.now_ms().div_euclid(DAY_MS);
        let today = self.store.group_adds_on(day, adder, added)?;
        let (per_adder, by_strangers) = (
            self.config.max_group_adds_per_adder_per_day,
            self.config.max_group_adds_by_strangers_per_day,
        );
        let mut adds = Vec::with_capacity(added.len());
        for ((user_id, contact), today) in added.iter().zip(contacts).zip(today) {
            if today.by_adder >= per_adder {
                return reject(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "you added {user_id} to groups {per_adder} times today, the most \
                         per day; try again after 00:00 UTC"
                    ),
                );
            }
            if !contact && today.by_strangers >= by_strangers {
                return reject(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{user_id} cannot be added to more groups today by someone they have \
                         not exchanged direct messages with; once you both have written in \
                         your direct conversation this limit no longer applies, otherwise \
                         try again after 00:00 UTC"
                    ),
                );
            }
            adds.push((user_id.clone(), !contact));
        }
        self.store.count_group_adds(day, adder, &adds)?;
        Ok(())
    }
}

/// A new group's or channel's members, ascending by user id: `others` as
/// members, the creator as its admin.
pub(super) fn initial_members<'a>(
    creator: &str,
    others: impl Iterator<Item = &'a str>,
) -> Vec<pb::Member> {
    let mut members: Vec<pb::Member> = others
        .map(|user_id| pb::Member {
            user_id: user_id.to_owned(),
            role: pb::Role::Member as i32,
        })
        .collect();
    members.push(pb::Member {
        user_id: creator.to_owned(),
        role: pb::Role::Admin as i32,
    });
    members.sort_unstable_by(|x, y| x.user_id.cmp(&y.user_id));
    members
}

/// What a ChangeMembers request does to a group, decided before anything is
/// written.
struct MemberChange {
    /// Members to add or give a new role (store `upsert`).
    upsert: Vec<pb::Member>,
    /// Users who were not members and are now.
    added: Vec<String>,
    /// Users who were members and are not any more.
    removed: Vec<String>,
    /// The member list afterwards, ascending by user id.
    members_after: Vec<pb::Member>,
}

/// Check a ChangeMembers request of `actor` against the group's current
/// `members` (user ids already validated) and work out its effect.
fn plan_member_change<'a>(
    members: &'a [pb::Member],
    actor: &str,
    change: &'a pb::ChangeMembers,
    config: &RouterConfig,
) -> Result<MemberChange, Failure> {
    let mut roles: BTreeMap<&'a str, pb::Role> = members
        .iter()
        .map(|m| (m.user_id.as_str(), m.role()))
        .collect();
    let Some(actor_role) = roles.get(actor).copied() else {
        return reject(
            ErrorCode::Forbidden,
            "you are not a member of this conversation",
        );
    };
    let add: BTreeSet<&str> = change.add_user_ids.iter().map(String::as_str).collect();
    let remove: BTreeSet<&str> = change.remove_user_ids.iter().map(String::as_str).collect();
    let promote: BTreeSet<&str> = change.promote_user_ids.iter().map(String::as_str).collect();
    if add.is_empty() && remove.is_empty() && promote.is_empty() {
        return reject(ErrorCode::InvalidArgument, "nothing to change");
    }
    if let Some(both) = add.intersection(&remove).next() {
        return reject(
            ErrorCode::InvalidArgument,
            format!("{both} is both added and removed"),
        );
    }
    if let Some(both) = promote.intersection(&remove).next() {
        return reject(
            ErrorCode::InvalidArgument,
            format!("{both} is both promoted and removed"),
        );
    }
    if let Some(stranger) = promote
        .iter()
        .find(|u| !roles.contains_key(*u) && !add.contains(*u))
    {
        return reject(
            ErrorCode::InvalidArgument,
            format!("cannot promote {stranger}: not a member"),
        );
    }
    let leaving_only = add.is_empty() && promote.is_empty() && remove.iter().all(|u| *u == actor);
    if actor_role != pb::Role::Admin && !leaving_only {
        return reject(
            ErrorCode::Forbidden,
            "only admins may add, remove or promote others; members may only remove themselves",
        );
    }

    let added: Vec<&str> = add
        .iter()
        .copied()
        .filter(|u| !roles.contains_key(u))
        .collect();
    let removed: Vec<&str> = remove
        .iter()
        .copied()
        .filter(|u| roles.contains_key(u))
        .collect();
    let size_after = roles.len() + added.len() - removed.len();
    if size_after > config.max_group_members {
        return reject(
            ErrorCode::TooManyMembers,
            format!(
                "the group would have {size_after} members, the limit is {}",
                config.max_group_members
            ),
        );
    }

    let mut upsert = Vec::new();
    let mut set_role =
        |roles: &mut BTreeMap<&'a str, pb::Role>, user_id: &'a str, role: pb::Role| {
            roles.insert(user_id, role);
            upsert.push(pb::Member {
                user_id: user_id.to_owned(),
                role: role as i32,
            });
        };
    for &user_id in &added {
        let role = if promote.contains(user_id) {
            pb::Role::Admin
        } else {
            pb::Role::Member
        };
        set_role(&mut roles, user_id, role);
    }
    for &user_id in &promote {
        if roles.get(user_id) == Some(&pb::Role::Member) {
            set_role(&mut roles, user_id, pb::Role::Admin);
        }
    }
    for user_id in &removed {
        roles.remove(user_id);
    }
    // A group never loses its last admin while it has members: the remaining
    // member with the smallest user id takes over.
    if !roles.values().any(|r| *r == pb::Role::Admin) {
        if let Some(&heir) = roles.keys().next() {
            set_role(&mut roles, heir, pb::Role::Admin);
        }
    }
    Ok(MemberChange {
        upsert,
        added: added.into_iter().map(str::to_owned).collect(),
        removed: removed.into_iter().map(str::to_owned).collect(),
        members_after: roles
            .into_iter()
            .map(|(user_id, role)| pb::Member {
                user_id: user_id.to_owned(),
                role: role as i32,
            })
            .collect(),
    })
}
