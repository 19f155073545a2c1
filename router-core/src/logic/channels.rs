//! Channels (SPEC §21): CreateConversation CHANNEL, ChangeMembers of a
//! channel (join, leave, admins), ListMembers (channels and groups),
//! OpenChannel, and a channel's Receipt and Typing. A channel's Send is in
//! `messages.rs` (`send_many`, `Access::Channel`).
//!
//! Nothing here costs more with more members: a membership check is one
//! lookup, a member list one page, a message or a Typing one `ChannelPost`
//! for every gateway (fan-out on read) instead of a frame per member, and
//! receipts move one read position. What does go to users directly
//! (ConversationCreated, MembersChanged, pushes) goes to the users a
//! request names, bounded by its size.

use std::collections::BTreeSet;

use palaver_protocol::pb::{self, frame::Body, ErrorCode};

use super::conversations::initial_members;
use super::{event, parse_conversation_id, reject, reply, ConversationRef, Failure, Router};
use crate::api::Inbound;
use crate::bus::{ChannelPost, Output};
use crate::group_id::channel_id_for;
use crate::store::{ChannelRecord, Store};

impl<S: Store> Router<S> {
    pub(super) fn create_channel(
        &mut self,
        req: &Inbound,
        create: &pb::CreateConversation,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let creator = &req.from.user_id;
        // A request names at most a group's worth; more join or are added later.
        let cap = self
            .config
            .max_group_members
            .min(self.config.max_channel_members);
        let others = self.check_new_members(creator, create, cap)?;
        let record = ChannelRecord {
            conversation_id: channel_id_for(req),
            title: create.title.clone(),
            settings: create.channel.unwrap_or_default(),
            created_ms: self.clock.now_ms(),
            member_count: 0,
            admin_count: 0,
        };
        // A replay of a create that happened is answered as it was, before
        // the add limits are counted again.
        if let Some(existing) = self.store.channel(&record.conversation_id)? {
            let last_seq = self
                .store
                .last_seqs(std::slice::from_ref(&record.conversation_id))?[0];
            let created = Body::ConversationCreated(pb::ConversationCreated {
                conversation: Some(channel_info(existing, last_seq)),
            });
            out.frames.push(reply(req, created));
            return Ok(());
        }
        let added: Vec<String> = others.iter().map(|u| (*u).to_owned()).collect();
        self.charge_group_adds(creator, &added, false)?;
        let members = initial_members(creator, added.iter().map(String::as_str));
        self.store.create_channel(&record, &members)?;
        let Some(created) = self.store.channel(&record.conversation_id)? else {
            return reject(ErrorCode::Unavailable, "channel creation raced; retry");
        };
        let user_ids: Vec<String> = members.into_iter().map(|m| m.user_id).collect();
        self.store
            .add_conversation_to_users(&record.conversation_id, &user_ids)?;
        let created = Body::ConversationCreated(pb::ConversationCreated {
            conversation: Some(channel_info(created, 0)),
        });
        self.reply_and_fan_out(req, created, &user_ids, out)?;
        Ok(())
    }

    /// ChangeMembers of a channel: admins add, remove and promote; anyone
    /// may leave; anyone may join a public channel (add themselves). The
    /// last admin may not leave while others stay. `MembersChanged` (the
    /// channel without its member list) goes to the requester and to the
    /// users the request names, not to every member.
    pub(super) fn change_channel_members(
        &mut self,
        req: &Inbound,
        change: &pb::ChangeMembers,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &change.conversation_id;
        let actor = &req.from.user_id;
        let Some(channel) = self.store.channel(conversation_id)? else {
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
        let actor_role = self.store.channel_role(conversation_id, actor)?;
        let joining_only = add.len() == 1
            && add.contains(actor.as_str())
            && remove.is_empty()
            && promote.is_empty();
        let leaving_only =
            add.is_empty() && promote.is_empty() && remove.iter().all(|u| u == actor);
        match actor_role {
            Some(pb::Role::Admin) => {}
            Some(_) if leaving_only => {}
            None if joining_only && channel.settings.public => {}
            None if joining_only => {
                return reject(
                    ErrorCode::Forbidden,
                    "this channel is not public: an admin must add you",
                )
            }
            None => {
                return reject(
                    ErrorCode::Forbidden,
                    "you are not a member of this conversation",
                )
            }
            Some(_) => {
                return reject(
                    ErrorCode::Forbidden,
                    "only admins may add, remove or promote others; members may only leave",
                )
            }
        }
        // Roles of the users named (bounded by the request's size).
        let mut admins_leaving = 0u32;
        let mut members_leaving = 0u32;
        for user_id in &remove {
            match self.store.channel_role(conversation_id, user_id)? {
                Some(pb::Role::Admin) => {
                    admins_leaving += 1;
                    members_leaving += 1;
                }
                Some(_) => members_leaving += 1,
                None => {}
            }
        }
        for user_id in &promote {
            if !add.contains(user_id)
                && self.store.channel_role(conversation_id, user_id)?.is_none()
            {
                return reject(
                    ErrorCode::InvalidArgument,
                    format!("cannot promote {user_id}: not a member"),
                );
            }
        }
        if admins_leaving > 0
            && admins_leaving >= channel.admin_count
            && promote.is_empty()
            && channel.member_count > members_leaving
        {
            return reject(
                ErrorCode::InvalidArgument,
                "the last admin cannot leave while members stay: promote another admin first",
            );
        }
        // Adding others counts against the add limits (SPEC §11); joining
        // a public channel yourself does not.
        let others_added: Vec<String> = add
            .iter()
            .filter(|u| **u != actor.as_str())
            .map(|u| (*u).to_owned())
            .collect();
        if !others_added.is_empty() {
            let mut new = Vec::with_capacity(others_added.len());
            for user_id in others_added {
                if self
                    .store
                    .channel_role(conversation_id, &user_id)?
                    .is_none()
                {
                    new.push(user_id);
                }
            }
            self.charge_group_adds(actor, &new, false)?;
        }
        let owned = |set: &BTreeSet<&str>| set.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let (add, promote, remove) = (owned(&add), owned(&promote), owned(&remove));
        let max = u32::try_from(self.config.max_channel_members).unwrap_or(u32::MAX);
        let Some(done) =
            self.store
                .change_channel_members(conversation_id, &add, &promote, &remove, max)?
        else {
            return reject(
                ErrorCode::TooManyMembers,
                format!("the channel would have more than {max} members"),
            );
        };
        self.store
            .add_conversation_to_users(conversation_id, &done.added)?;
        self.store
            .remove_conversation_from_users(conversation_id, &done.removed)?;
        let last_seq = self
            .store
            .last_seqs(std::slice::from_ref(conversation_id))?[0];
        let after = ChannelRecord {
            member_count: done.member_count,
            admin_count: done.admin_count,
            ..channel
        };
        let changed = Body::MembersChanged(pb::MembersChanged {
            conversation: Some(channel_info(after, last_seq)),
            actor_user_id: actor.clone(),
            added_user_ids: done.added.clone(),
            removed_user_ids: done.removed.clone(),
        });
        let mut told: Vec<String> = done
            .added
            .iter()
            .chain(&done.removed)
            .chain(&done.promoted)
            .cloned()
            .collect();
        told.push(actor.clone());
        told.sort_unstable();
        told.dedup();
        self.reply_and_fan_out(req, changed, &told, out)?;
        Ok(())
    }

    /// A page of a conversation's members, ascending by user id, for its
    /// members: a channel's from the store, a group's from its record, a
    /// direct conversation's two.
    pub(super) fn list_members(
        &mut self,
        req: &Inbound,
        list: &pb::ListMembers,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &list.conversation_id;
        let user = &req.from.user_id;
        let limit = match list.limit as usize {
            0 => self.config.default_batch,
            n => n.min(self.config.max_batch),
        };
        let after = list.after_user_id.as_str();
        let (members, has_more, member_count) = match parse_conversation_id(conversation_id)? {
            ConversationRef::Channel => {
                let Some(channel) = self.store.channel(conversation_id)? else {
                    return reject(
                        ErrorCode::NotFound,
                        format!("no conversation {conversation_id}"),
                    );
                };
                if self.store.channel_role(conversation_id, user)?.is_none() {
                    return reject(
                        ErrorCode::Forbidden,
                        "you are not a member of this conversation",
                    );
                }
                let (members, more) = self.store.channel_members(conversation_id, after, limit)?;
                (members, more, channel.member_count)
            }
            ConversationRef::Direct { .. } | ConversationRef::Group => {
                self.check_member(conversation_id, user)?;
                let all: Vec<pb::Member> = match self.group_of(conversation_id)? {
                    Some(group) => group.members,
                    None => match parse_conversation_id(conversation_id)? {
                        ConversationRef::Direct { a, b } => [a, b]
                            .into_iter()
                            .map(|user_id| pb::Member {
                                user_id: user_id.to_owned(),
                                role: pb::Role::Member as i32,
                            })
                            .collect(),
                        _ => Vec::new(),
                    },
                };
                let count = all.len() as u32;
                let mut rest = all
                    .into_iter()
                    .filter(|m| after.is_empty() || m.user_id.as_str() > after);
                let page: Vec<pb::Member> = rest.by_ref().take(limit).collect();
                let more = rest.next().is_some();
                (page, more, count)
            }
        };
        out.frames.push(reply(
            req,
            Body::MemberPage(pb::MemberPage {
                conversation_id: conversation_id.clone(),
                members,
                has_more,
                member_count,
            }),
        ));
        Ok(())
    }

    /// What this connection receives of a channel: checked here (a member
    /// of a channel), carried out by the gateway when the answer passes it.
    /// CLOSED is answered without a check: a removed member may always stop.
    pub(super) fn open_channel(
        &mut self,
        req: &Inbound,
        open: &pb::OpenChannel,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &open.conversation_id;
        let mode = match pb::ChannelMode::try_from(open.mode) {
            Ok(mode) => mode,
            Err(_) => {
                return reject(
                    ErrorCode::InvalidArgument,
                    format!("channel mode {} is not CLOSED, COUNTS or LIVE", open.mode),
                )
            }
        };
        if !matches!(
            parse_conversation_id(conversation_id)?,
            ConversationRef::Channel
        ) {
            return reject(
                ErrorCode::InvalidArgument,
                format!("{conversation_id} is not a channel: OpenChannel is for channels"),
            );
        }
        let (last_seq, read_seq) = if mode == pb::ChannelMode::Closed {
            (0, 0)
        } else {
            self.check_member(conversation_id, &req.from.user_id)?;
            let last_seq = self
                .store
                .last_seqs(std::slice::from_ref(conversation_id))?[0];
            let read_seq = self
                .store
                .read_position(conversation_id, &req.from.user_id)?;
            (last_seq, read_seq)
        };
        out.frames.push(reply(
            req,
            Body::ChannelOpened(pb::ChannelOpened {
                conversation_id: conversation_id.clone(),
                mode: mode as i32,
                last_seq,
                read_seq,
            }),
        ));
        Ok(())
    }

    /// A channel's Receipt: READ raises the reader's read position (clamped
    /// to the last message) and tells the reader's other devices; nobody
    /// else hears of it. DELIVERED has no meaning in a channel and is
    /// ignored without an error (a client that predates channels sends it
    /// for every message it syncs, SPEC §16).
    pub(super) fn channel_receipt(
        &mut self,
        req: &Inbound,
        receipt: &pb::Receipt,
        kind: pb::ReceiptKind,
        out: &mut Output,
    ) -> Result<(), Failure> {
        let conversation_id = &receipt.conversation_id;
        let reader = &req.from.user_id;
        self.check_member(conversation_id, reader)?;
        if kind != pb::ReceiptKind::Read {
            return Ok(());
        }
        self.store
            .clear_push_pending(reader, Some(conversation_id))?;
        let last_seq = self
            .store
            .last_seqs(std::slice::from_ref(conversation_id))?[0];
        let up_to_seq = receipt.up_to_seq.min(last_seq);
        if up_to_seq == 0 {
            return Ok(());
        }
        let position = self
            .store
            .raise_read_position(conversation_id, reader, up_to_seq)?;
        if position != up_to_seq {
            // Already read further: nothing moved.
            return Ok(());
        }
        let update = event(Body::ReceiptUpdate(pb::ReceiptUpdate {
            conversation_id: conversation_id.clone(),
            user_id: reader.clone(),
            kind: pb::ReceiptKind::Read as i32,
            up_to_seq,
        }));
        Ok(self.fan_out(
            std::slice::from_ref(reader),
            Some(&req.from.addr),
            &update,
            out,
        )?)
    }

    /// A channel's Typing: one post for the gateways, which hand it to the
    /// connections that have the channel LIVE (and bound it there).
    pub(super) fn channel_typing(
        &mut self,
        req: &Inbound,
        typing: &pb::Typing,
        out: &mut Output,
    ) -> Result<(), Failure> {
        self.check_member(&typing.conversation_id, &req.from.user_id)?;
        out.channel_posts.push(ChannelPost {
            conversation_id: typing.conversation_id.clone(),
            frame: event(Body::Typing(pb::Typing {
                conversation_id: typing.conversation_id.clone(),
                active: typing.active,
                user_id: req.from.user_id.clone(),
            })),
            last_seq: 0,
            from: Some(req.from.addr.clone()),
        });
        Ok(())
    }

    /// `user_id`'s role in the channel (one lookup); NOT_FOUND without the
    /// channel, FORBIDDEN for a non-member (conversation check c3-c4).
    pub(super) fn channel_role_of(
        &mut self,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<pb::Role, Failure> {
        if let Some(role) = self.store.channel_role(conversation_id, user_id)? {
            return Ok(role);
        }
        match self.store.channel(conversation_id)? {
            None => reject(
                ErrorCode::NotFound,
                format!("no conversation {conversation_id}"),
            ),
            Some(_) => reject(
                ErrorCode::Forbidden,
                "you are not a member of this conversation",
            ),
        }
    }

    /// May `sender` post in the channel, and which of `mentions` are its
    /// members (pushed to when offline; at most `max_mentions` named).
    pub(super) fn channel_send_check(
        &mut self,
        conversation_id: &str,
        sender: &str,
        mentions: &[String],
    ) -> Result<Vec<String>, Failure> {
        let role = self.channel_role_of(conversation_id, sender)?;
        if role != pb::Role::Admin {
            let Some(channel) = self.store.channel(conversation_id)? else {
                return reject(
                    ErrorCode::NotFound,
                    format!("no conversation {conversation_id}"),
                );
            };
            if channel.settings.admins_only_post {
                return reject(
                    ErrorCode::Forbidden,
                    "only admins post in this channel (an announcement channel)",
                );
            }
        }
        if mentions.len() > self.config.max_mentions {
            return reject(
                ErrorCode::InvalidArgument,
                format!(
                    "{} mentions, the limit is {}",
                    mentions.len(),
                    self.config.max_mentions
                ),
            );
        }
        let mut members = Vec::with_capacity(mentions.len());
        for user_id in mentions {
            if user_id != sender
                && !members.contains(user_id)
                && palaver_protocol::is_valid_id(user_id)
                && self.store.channel_role(conversation_id, user_id)?.is_some()
            {
                members.push(user_id.clone());
            }
        }
        members.sort_unstable();
        Ok(members)
    }
}

/// A channel as clients see it: no member list (ListMembers pages it), its
/// member count and settings.
pub(super) fn channel_info(channel: ChannelRecord, last_seq: u64) -> pb::Conversation {
    pb::Conversation {
        conversation_id: channel.conversation_id,
        kind: pb::ConversationKind::Channel as i32,
        title: channel.title,
        members: Vec::new(),
        last_seq,
        member_count: channel.member_count,
        channel: Some(channel.settings),
    }
}
